"""The mask decoder's two-way transformer: prompt tokens and image tokens attend to each other."""

from typing import Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from segany.modeling.common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose q/k/v live in a (possibly) downsampled internal dimension."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide internal dim {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # -> (B, heads, N, C/heads)
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (Bq, Nq, C), k / v (Bk, Nk, C); one of Bq, Bk may be 1 and is shared by every row of
        the other (the mask decoder's first layer: one image's tokens for all prompts)."""
        p = self.dropout if self.training else 0.0
        bq, bk = q.shape[0], k.shape[0]
        head_dim = self.internal_dim // self.num_heads
        # few prompt tokens against many image tokens, one image per row: the projections of the
        # many are folded into the few (see _tokens_to_image / _image_to_tokens). Inference only:
        # the folded form never uses k_proj.bias (softmax ignores it), and a parameter without a
        # gradient breaks DDP (unused parameter) and FSDP checkpoints (no optimiser state for it)
        fold = p == 0.0 and not torch.is_grad_enabled()
        if fold and bk > 1 and bq in (1, bk) and k.shape[1] < head_dim and q.shape[1] > k.shape[1]:
            return self._image_to_tokens(q, k, v)
        if fold and bq > 1 and bk == bq and q.shape[1] < head_dim and k.shape[1] > q.shape[1]:
            return self._tokens_to_image(q, k, v)
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        if bk == 1 and bq > 1:  # shared keys: the rows' queries attend as one longer query sequence
            _, h, n, c = q.shape
            out = F.scaled_dot_product_attention(q.transpose(0, 1).reshape(1, h, bq * n, c), k, v, dropout_p=p)
            out = out.view(h, bq, n, c).transpose(0, 1)  # (Bq, heads, Nq, c)
        else:
            if bq == 1 and bk > 1:  # shared queries, per-row keys
                q = q.expand(bk, -1, -1, -1)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))

    def _tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention for T few queries (B, T, C) over M many keys / values (B, M, C), T < head dim.

        The k / v projections of the M image tokens (2 x M*C*C/r multiply-adds per row) are not
        computed: with W_k, W_v the head's slices, softmax(q_h (k W_k^T + b_k)^T) (v W_v^T + b_v) =
        softmax((q_h W_k) k^T) (v) W_v^T + b_v, since q_h . b_k is the same for every key (softmax
        ignores it) and each softmax row sums to 1; cost 2 x heads*T*M*C instead."""
        b, t, c = q.shape
        h = self.num_heads
        d = self.internal_dim // h
        qh = self.q_proj(q).view(b, t, h, d) * d**-0.5  # (B, T, h, d), scaled as in SDPA
        qk = torch.einsum("bthd,hdc->bhtc", qh, self.k_proj.weight.view(h, d, c)).reshape(b, h * t, c)
        attn = torch.bmm(qk, k.transpose(1, 2)).softmax(-1)  # (B, h*T, M)
        av = torch.bmm(attn, v).view(b, h, t, c)  # (B, h, T, C) attention-weighted raw values
        out = torch.einsum("bhtc,hdc->bthd", av, self.v_proj.weight.view(h, d, c)).reshape(b, t, h * d)
        return self.out_proj(out + self.v_proj.bias)

    def _image_to_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention for M many queries (1|B, M, C) over T few keys / values (B, T, C), T < head dim.

        The out projection is folded into the values, sum_h A_h (V_h W_o,h^T) + b_o with A (B, M, h*T),
        and, when the queries are per row, the q projection into the keys, (x W_q^T + b_q) K_h^T =
        x (W_q,h^T K_h^T) + b_q,h K_h^T: 2 x heads*T*M*C multiply-adds per row instead of 2 x M*C*C/r.
        A query set shared by every row (1, M, C) is projected once."""
        b, t, c = k.shape
        h = self.num_heads
        d = self.internal_dim // h
        m = q.shape[1]
        kh = self.k_proj(k).view(b, t, h, d) * d**-0.5  # (B, T, h, d), scaled as in SDPA
        vh = self.v_proj(v).view(b, t, h, d)
        # softmax rows sum to 1 per head: b_o / h on each of the h*T value rows adds b_o once
        u = torch.einsum("bthd,chd->bhtc", vh, self.out_proj.weight.view(c, h, d)).reshape(b, h * t, c)
        u = u + self.out_proj.bias / h  # (B, h*T, C)
        # scores laid out (B, h*T, M): the softmax over T then runs along contiguous M-rows
        if q.shape[0] == 1:
            qh = self.q_proj(q[0]).view(m, h, d)  # shared by the rows
            scores = torch.einsum("bthd,mhd->bhtm", kh, qh).reshape(b, h * t, m)
        else:
            wq = torch.einsum("bthd,hdc->bhtc", kh, self.q_proj.weight.view(h, d, c)).reshape(b, h * t, c)
            bias = torch.einsum("hd,bthd->bht", self.q_proj.bias.view(h, d), kh).reshape(b, h * t, 1)
            scores = torch.baddbmm(bias, wq, q.transpose(1, 2))  # (B, h*T, M)
        attn = scores.view(b, h, t, m).softmax(2).view(b, h * t, m)
        return torch.bmm(attn.transpose(1, 2), u)  # (B, M, C)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention on tokens, tokens -> image, MLP on tokens, image -> tokens."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation, dropout)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        # queries (N, T, C) prompt tokens; keys (1|N, HW, C) image tokens (1: shared by every row,
        # becomes N after the image -> token attention); key_pe broadcasts (1|N, HW, C)
        if self.skip_first_layer_pe:  # layer 0: the tokens *are* their PE, no residual
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
                dropout=dropout,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embedding (1|N, C, h, w), image_pe (1|N, C, h, w), point_embedding (N, T, C)
        -> tokens (N, T, C), image tokens (N, hw, C). One image embedding is shared by the N rows."""
        # token-major (N, hw, C) rows: the residual sums and LayerNorms then run on contiguous rows;
        # no copy when the input is channels-last (the training rounds), one copy otherwise
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys.expand(queries.shape[0], -1, -1)
