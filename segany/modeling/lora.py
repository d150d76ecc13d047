"""LoRA adapters on the image encoder's linear projections, through `peft`.

    build_sam("vit_b", checkpoint="sam_vit_b_01ec64.pth", lora={"rank": 8, "alpha": 16, "targets": ["qkv"]})

`add_lora` puts a peft LoRA layer on each targeted `nn.Linear` of every encoder block
(`peft.inject_adapter_in_model`: W x + B A dropout(x) * alpha / rank, B initialised to zero,
so a fresh adapter leaves the model's outputs unchanged) and freezes everything else in the
encoder: its trainable parameters are the adapters only. The prompt encoder and the mask
decoder are untouched (SamModule's freeze_* decide whether they train).

State-dict keys of an adapted projection (peft's layout; adapter name "default"):
    blocks.3.attn.qkv.base_layer.weight / .bias    the frozen release weights
    blocks.3.attn.qkv.lora_A.default.weight        (rank, in)
    blocks.3.attn.qkv.lora_B.default.weight        (out, rank)
so train.py checkpoints (Lightning file or FSDP directory) hold base and adapter, and resume
as they were written. `merge_lora` folds a state dict back into the release layout
(W + B A * alpha / rank under the original key): segany.modeling.checkpoint's reader applies it
to every checkpoint it reads and `save_official` to a live model, so export, evaluate.py, the data
engine and `build_sam(checkpoint=...)` all see a plain SAM. It works on tensors, not on a
built model, because checkpoints are read as data without building a network (peft's own
`merge()` needs the peft modules); the formula is peft's for plain LoRA (no rsLoRA / DoRA,
which this spec does not offer), and tests/test_lora.py checks the merged model against the
unmerged one in the official `segment_anything` package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

ADAPTER = "default"  # peft's adapter name
# short name -> the module path inside an encoder block (timm's VisionTransformerSAM names)
TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_A, _B, _BASE = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight", ".base_layer."


@dataclass(frozen=True)
class LoraSpec:
    """The `model.lora` config node (a keyword of build_sam). rank: r of B (out, r) A (r, in);
    alpha: the update is scaled by alpha / rank; targets: which projections of every encoder
    block get an adapter (qkv, proj: attention; fc1, fc2: MLP); dropout: on the adapter's input."""

    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] = ("qkv",)
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"model.lora.rank={self.rank!r}: must be an integer >= 1")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha={self.alpha!r}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout!r}: must be in [0, 1)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"model.lora.targets={list(self.targets)!r}: choose one or more of {sorted(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def lora_spec(node) -> Optional[LoraSpec]:
    """None / a LoraSpec / a config mapping (model.lora) -> LoraSpec or None; bad keys fail naming them."""
    if node is None or isinstance(node, LoraSpec):
        return node
    if not isinstance(node, Mapping):
        raise ValueError(f"model.lora: expected a mapping {{rank, alpha, targets, dropout}} or null, got {node!r}")
    fields = dict(node)
    unknown = sorted(set(fields) - set(LoraSpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model.lora: unknown key(s) {unknown}; valid keys: {sorted(LoraSpec.__dataclass_fields__)}")
    if "targets" in fields:
        fields["targets"] = [fields["targets"]] if isinstance(fields["targets"], str) else list(fields["targets"])
    return LoraSpec(**fields)


def target_regex(spec: LoraSpec) -> str:
    """The module names (relative to the encoder) that get an adapter: `blocks.<i>.<path>` only,
    so `proj` does not also catch the patch embedding's conv (`patch_embed.proj`)."""
    paths = "|".join(re.escape(TARGETS[t]) for t in spec.targets)
    return rf"blocks\.\d+\.(?:{paths})"


def add_lora(encoder: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject `spec`'s adapters into `encoder` in place (and return it); the encoder's other
    parameters stop requiring gradients."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("model.lora needs the `peft` package: pip install peft (or pip install -e '.[lora]')") from e
    config = LoraConfig(
        r=int(spec.rank),
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_regex(spec),
        bias="none",
    )
    inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
    return encoder


def is_lora_key(key: str) -> bool:
    return key.endswith((_A, _B)) or _BASE in key


def has_lora(state_dict: Mapping) -> bool:
    return any(is_lora_key(k) for k in state_dict)


def merge_lora(state_dict: Dict[str, torch.Tensor], spec: Optional[LoraSpec], where: str = "state dict"):
    """A state dict with peft LoRA keys -> the plain one: `<m>.weight = W + B A * alpha / rank`
    (computed in fp32, stored in W's dtype), `<m>.bias` = the base bias, adapters dropped.
    A dict without LoRA keys comes back as it is."""
    if not has_lora(state_dict):
        return state_dict
    if spec is None:
        raise ValueError(
            f"{where} holds LoRA adapter weights (*.lora_A/lora_B) but no model.lora config "
            f"(rank, alpha) to merge them with"
        )
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for key, A in state_dict.items():
        if not key.endswith(_A):
            continue
        module = key[: -len(_A)]
        try:
            B, W = state_dict[module + _B], state_dict[module + _BASE + "weight"]
        except KeyError as e:
            raise ValueError(f"{where}: LoRA adapter of {module!r} is incomplete (no {e.args[0]!r})") from None
        if A.shape[0] != spec.rank or B.shape[1] != spec.rank:
            raise ValueError(
                f"{where}: LoRA adapter of {module!r} has rank {A.shape[0]}, "
                f"its config says model.lora.rank={spec.rank}"
            )
        delta = B.detach().float() @ A.detach().float()  # (out, r) @ (r, in) -> (out, in)
        out[module + ".weight"] = (W.detach().float() + delta * spec.scale).to(W.dtype)
        if module + _BASE + "bias" in state_dict:
            out[module + ".bias"] = state_dict[module + _BASE + "bias"]
    left = [k for k in state_dict if _BASE in k and k.rsplit(_BASE, 1)[0] + _A not in state_dict]
    for k in left:  # a wrapped layer whose adapter was absent: its base weights under the plain name
        out[k.replace(_BASE, ".")] = state_dict[k]
    return out


def lora_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """name -> parameter of every LoRA adapter in `model`."""
    return {n: p for n, p in model.named_parameters() if n.endswith((_A, _B))}
