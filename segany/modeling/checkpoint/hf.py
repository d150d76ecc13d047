"""Hugging Face formats, read as data (safetensors + json; transformers is never imported):
a plain `.safetensors` weights file, and a `transformers.SamModel` directory (`config.json`
with model_type "sam" + `model.safetensors`, or shards listed in `model.safetensors.index.json`).

Key names, segany <-> SamModel (one table, `_PAIRS`, read both ways; {i}, {n} are indices):

  image_encoder.pos_embed                      vision_encoder.pos_embed
  image_encoder.patch_embed.proj               vision_encoder.patch_embed.projection
  image_encoder.blocks.{i}.norm{n}             vision_encoder.layers.{i}.layer_norm{n}
  image_encoder.blocks.{i}.attn.*              vision_encoder.layers.{i}.attn.*  (fused qkv, proj,
                                               rel_pos_h/w: same layout and shapes)
  image_encoder.blocks.{i}.mlp.fc{n}           vision_encoder.layers.{i}.mlp.lin{n}
  image_encoder.neck.0 / 1 / 2 / 3             vision_encoder.neck.conv1 / layer_norm1 / conv2 / layer_norm2
  prompt_encoder.pe_layer.positional_encoding_gaussian_matrix (2, C/2)
                                               shared_image_embedding.positional_embedding
  prompt_encoder.point_embeddings.{i}          prompt_encoder.point_embed.{i}  (neg, pos, box TL, box BR)
  prompt_encoder.mask_downscaling.0 / 1 / 3 / 4 / 6
                                   prompt_encoder.mask_embed.conv1 / layer_norm1 / conv2 / layer_norm2 / conv3
  mask_decoder.transformer.layers.{i}.norm{n}  mask_decoder.transformer.layers.{i}.layer_norm{n}
  mask_decoder.transformer.norm_final_attn     mask_decoder.transformer.layer_norm_final_attn
  mask_decoder.output_upscaling.0 / 1 / 3      mask_decoder.upscale_conv1 / upscale_layer_norm / upscale_conv2
  <mlp>.layers.0 / .layers.k / .layers.{d-1}   <mlp>.proj_in / .layers.{k-1} / .proj_out   (the hypernetwork
                                               MLPs, depth 3, and the IoU head, depth iou_head_depth)
  everything else (attention q/k/v/out_proj, decoder mlp.lin1/2, tokens, no_mask / not_a_point) as it is.

HF-only: `prompt_encoder.shared_embedding.positional_embedding`, SamModel's tied copy of
`shared_image_embedding.positional_embedding` (save_pretrained writes only the latter; both
are read, and must then be equal). segany-only: the text prompt token (`text_embed_dim > 0`,
prompt_encoder.text_proj / text_embed) and HQ-SAM's token (`hq_token`), which SamModel
cannot hold: refused. pixel_mean /
pixel_std are not weights on either side (SamModel's image processor normalises).

Architecture: `hf_config(SamConfig)` / `sam_arch(config.json dict)` (and, written beside them,
`hf_preprocessor(SamConfig)`: the SamImageProcessor settings of segany's pre-processing); what SamModel can set and
segany cannot (a setting other than the release's: non-gelu encoder, no qkv bias, mlp_dim !=
4 x hidden_size, attention_downsample_rate != 2, ...) is refused naming the field. One HF
setting is accepted though segany computes it otherwise: the decoder's layer_norm_eps 1e-6
(HF's converted checkpoints; the release, and segany, use LayerNorm's 1e-5 there; written
back as 1e-5, so an exported directory computes exactly as segany).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from segany.modeling.checkpoint.trust import CheckpointError
from segany.modeling.constants import PIXEL_MEAN, PIXEL_STD
from segany.modeling.variants import SamConfig

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_PREPROCESSOR = "preprocessor_config.json"  # SamImageProcessor's: what SamProcessor.from_pretrained reads
MODEL_TYPE = "sam"
SAFETENSORS = ".safetensors"
TIED = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")

# (segany prefix, SamModel prefix); the first pair whose template matches a key wins
_PAIRS = [
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{i}.norm{n}.", "vision_encoder.layers.{i}.layer_norm{n}."),
    ("image_encoder.blocks.{i}.attn.", "vision_encoder.layers.{i}.attn."),
    ("image_encoder.blocks.{i}.mlp.fc{n}.", "vision_encoder.layers.{i}.mlp.lin{n}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", TIED[1]),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{i}.norm{n}.", "mask_decoder.transformer.layers.{i}.layer_norm{n}."),
    ("mask_decoder.transformer.layers.{i}.", "mask_decoder.transformer.layers.{i}."),
    ("mask_decoder.transformer.final_attn_token_to_image.", "mask_decoder.transformer.final_attn_token_to_image."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.iou_token.", "mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "mask_decoder.mask_tokens."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
]
# the MLP heads: segany's `layers.{k}` for k < depth; SamModel's proj_in, layers.{k-1}, proj_out
_HEADS = {"mask_decoder.output_hypernetworks_mlps.{i}.": "hypernetwork", "mask_decoder.iou_prediction_head.": "iou"}
HYPERNETWORK_DEPTH = 3  # fixed in both (the release's MLP(C, C, C/8, 3))


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, name, literal, ...
    body = "".join(re.escape(p) if j % 2 == 0 else f"(?P<{p}>\\d+)" for j, p in enumerate(parts))
    return re.compile(body + r"(?P<rest>.*)")


_TO_HF = [(_regex(s), h) for s, h in _PAIRS]
_FROM_HF = [(_regex(h), s) for s, h in _PAIRS]
_HEAD_RES = [(_regex(h + "layers.{k}."), h, name) for h, name in _HEADS.items()]
_HF_HEAD = re.compile(r"(?P<head>.*?)\.(?:(?P<pin>proj_in)|(?P<pout>proj_out)|layers\.(?P<k>\d+))\.(?P<rest>[^.]+)$")


def _depths(cfg: SamConfig) -> Dict[str, int]:
    return {"hypernetwork": HYPERNETWORK_DEPTH, "iou": cfg.iou_head_depth}


def hf_key(key: str, cfg: SamConfig) -> str:
    """segany key -> SamModel key (CheckpointError for a key SamModel has no place for)."""
    for head_re, head, name in _HEAD_RES:
        if m := head_re.fullmatch(key):
            k, depth = int(m["k"]), _depths(cfg)[name]
            part = "proj_in" if k == 0 else "proj_out" if k == depth - 1 else f"layers.{k - 1}"
            return head.format(**m.groupdict()) + f"{part}.{m['rest']}"
    for rx, target in _TO_HF:
        if m := rx.fullmatch(key):
            return target.format(**m.groupdict()) + m["rest"]
    raise CheckpointError(f"segany key {key!r} has no counterpart in transformers.SamModel")


def segany_key(key: str, cfg: SamConfig) -> Optional[str]:
    """SamModel key -> segany key; None for the tied copy of the positional matrix."""
    if key == TIED[0]:
        return None
    if key.startswith(("mask_decoder.output_hypernetworks_mlps.", "mask_decoder.iou_prediction_head.")):
        m = _HF_HEAD.fullmatch(key)
        if m:
            name = "iou" if m["head"].endswith("iou_prediction_head") else "hypernetwork"
            depth = _depths(cfg)[name]
            k = 0 if m["pin"] else depth - 1 if m["pout"] else int(m["k"]) + 1
            if m["k"] is None or k < depth - 1:  # layers.{j}: the middle ones only
                return f"{m['head']}.layers.{k}.{m['rest']}"
    else:
        for rx, target in _FROM_HF:
            if m := rx.fullmatch(key):
                return target.format(**m.groupdict()) + m["rest"]
    raise CheckpointError(f"transformers.SamModel key {key!r} has no counterpart in segany's SAM")


def to_hf(state_dict: Dict[str, torch.Tensor], cfg: SamConfig) -> Dict[str, torch.Tensor]:
    """segany-named SAM weights -> SamModel's state dict (as save_pretrained writes it: the tied
    positional matrix once). The text token (text_embed_dim > 0) is refused."""
    _expressible(cfg)
    return {hf_key(k, cfg): v for k, v in state_dict.items()}


def _expressible(cfg: SamConfig) -> None:
    """Refuse, naming the field, what transformers.SamModel cannot hold."""
    if cfg.text_embed_dim:
        raise CheckpointError(
            f"text_embed_dim={cfg.text_embed_dim}: transformers.SamModel has no text prompt token; "
            "export a model without one (text_embed_dim=0)"
        )
    if getattr(cfg, "hq_token", False):
        raise CheckpointError("hq_token=True: transformers.SamModel has no HQ-SAM output token")
    if cfg.iou_head_depth < 2:
        raise CheckpointError(f"iou_head_depth={cfg.iou_head_depth}: transformers.SamModel's IoU head has >= 2 layers")


def from_hf(state_dict: Dict[str, torch.Tensor], cfg: SamConfig, where: str) -> Dict[str, torch.Tensor]:
    """SamModel's state dict -> segany names. The two copies of the positional matrix must agree."""
    pe = [state_dict[k] for k in TIED if k in state_dict]
    if len(pe) == 2 and not torch.equal(*pe):
        raise CheckpointError(f"{where}: the tied tensors {TIED[0]!r} and {TIED[1]!r} differ")
    out = {}
    for k, v in state_dict.items():
        if (s := segany_key(k, cfg)) is not None:
            out[s] = v
    if pe and "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" not in out:
        out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = pe[0]
    return out


# ----------------------------------------------------------------- architecture

# transformers' SamConfig defaults (a config.json may leave any of them out)
VISION_DEFAULTS = dict(
    hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=1024, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, mlp_ratio=4.0,
    use_abs_pos=True, use_rel_pos=True, window_size=14, global_attn_indexes=[2, 5, 8, 11], num_pos_feats=128,
    mlp_dim=None,
)  # fmt: skip
PROMPT_DEFAULTS = dict(
    hidden_size=256, image_size=1024, patch_size=16, mask_input_channels=16, num_point_embeddings=4,
    hidden_act="gelu", layer_norm_eps=1e-6,
)  # fmt: skip
DECODER_DEFAULTS = dict(
    hidden_size=256, hidden_act="relu", mlp_dim=2048, num_hidden_layers=2, num_attention_heads=8,
    attention_downsample_rate=2, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
    layer_norm_eps=1e-6,
)  # fmt: skip
RELEASE_LN_EPS = 1e-6  # the encoder's, the neck's and the prompt encoder's LayerNorms
DECODER_LN_EPS = 1e-5  # the two-way transformer's (nn.LayerNorm's default, as the release)


def hf_config(cfg: SamConfig) -> dict:
    """segany's architecture -> a transformers SamConfig dict (config.json)."""
    _expressible(cfg)
    d = cfg.prompt_embed_dim
    vision = {
        **VISION_DEFAULTS,
        "model_type": "sam_vision_model",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "global_attn_indexes": list(cfg.global_attn_indexes),
        "window_size": cfg.window_size,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "mlp_dim": 4 * cfg.embed_dim,
        "output_channels": d,
        "num_pos_feats": d // 2,
    }
    prompt = {
        **PROMPT_DEFAULTS,
        "model_type": "sam_prompt_encoder",
        "hidden_size": d,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "mask_input_channels": cfg.mask_in_chans,
    }
    decoder = {
        **DECODER_DEFAULTS,
        "model_type": "sam_mask_decoder",
        "hidden_size": d,
        "mlp_dim": cfg.decoder_mlp_dim,
        "num_hidden_layers": cfg.decoder_depth,
        "num_attention_heads": cfg.decoder_heads,
        "num_multimask_outputs": cfg.num_multimask_outputs,
        "iou_head_depth": cfg.iou_head_depth,
        "iou_head_hidden_dim": cfg.iou_head_hidden_dim,
        "layer_norm_eps": DECODER_LN_EPS,
    }
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["SamModel"],
        "vision_config": vision,
        "prompt_encoder_config": prompt,
        "mask_decoder_config": decoder,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }


def hf_preprocessor(cfg: SamConfig) -> dict:
    """The SamImageProcessor settings of segany's pre-processing at this size: longest side
    resized to img_size, zero padding at the bottom / right to img_size x img_size, the
    release's mean and std (on 0-1 pixels), masks at a quarter of that."""
    s, low = cfg.img_size, cfg.img_size // 4
    return {
        "image_processor_type": "SamImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": s},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [m / 255 for m in PIXEL_MEAN],
        "image_std": [d / 255 for d in PIXEL_STD],
        "do_pad": True,
        "pad_size": {"height": s, "width": s},
        "mask_size": {"longest_edge": low},
        "mask_pad_size": {"height": low, "width": low},
    }


def _square(v, field: str, where: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise CheckpointError(f"{where}: {field}={v}: segany's SAM takes square images and patches only")
        v = v[0]
    return int(v)


def sam_arch(config: dict, where: str) -> dict:
    """A transformers SamConfig dict (config.json) -> the build_sam keywords of its architecture.
    What segany cannot build is refused, naming the field."""
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{where}: model_type={config.get('model_type')!r}; only transformers' SamModel (model_type "
            f"{MODEL_TYPE!r}) is read"
        )
    sub = {}
    for name, defaults in (
        ("vision_config", VISION_DEFAULTS),
        ("prompt_encoder_config", PROMPT_DEFAULTS),
        ("mask_decoder_config", DECODER_DEFAULTS),
    ):
        given = config.get(name) or {}
        if not isinstance(given, dict):
            raise CheckpointError(f"{where}: {name} is a {type(given).__name__}, not a dict")
        sub[name] = {**defaults, **given}
    v, p, m = sub["vision_config"], sub["prompt_encoder_config"], sub["mask_decoder_config"]
    img = _square(v["image_size"], "vision_config.image_size", where)
    patch = _square(v["patch_size"], "vision_config.patch_size", where)
    p_img = _square(p["image_size"], "prompt_encoder_config.image_size", where)
    p_patch = _square(p["patch_size"], "prompt_encoder_config.patch_size", where)
    mlp_dim = v["mlp_dim"] if v["mlp_dim"] is not None else int(v["hidden_size"] * v["mlp_ratio"])
    d = v["output_channels"]
    need = {  # field: (its value, what segany builds)
        "vision_config.num_channels": (v["num_channels"], 3),
        "vision_config.hidden_act": (v["hidden_act"], "gelu"),
        "vision_config.layer_norm_eps": (v["layer_norm_eps"], RELEASE_LN_EPS),
        "vision_config.qkv_bias": (v["qkv_bias"], True),
        "vision_config.use_abs_pos": (v["use_abs_pos"], True),
        "vision_config.use_rel_pos": (v["use_rel_pos"], True),
        "vision_config.mlp_dim": (mlp_dim, 4 * v["hidden_size"]),
        "vision_config.num_pos_feats": (v["num_pos_feats"], d // 2),
        "prompt_encoder_config.hidden_size": (p["hidden_size"], d),
        "prompt_encoder_config.image_size": (p_img, img),
        "prompt_encoder_config.patch_size": (p_patch, patch),
        "prompt_encoder_config.num_point_embeddings": (p["num_point_embeddings"], 4),
        "prompt_encoder_config.hidden_act": (p["hidden_act"], "gelu"),
        "prompt_encoder_config.layer_norm_eps": (p["layer_norm_eps"], RELEASE_LN_EPS),
        "mask_decoder_config.hidden_size": (m["hidden_size"], d),
        "mask_decoder_config.hidden_act": (m["hidden_act"], "relu"),
        "mask_decoder_config.attention_downsample_rate": (m["attention_downsample_rate"], 2),
    }
    bad = [f"{k}={got!r} (segany: {want!r})" for k, (got, want) in need.items() if got != want]
    if m["layer_norm_eps"] not in (DECODER_LN_EPS, 1e-6):
        bad.append(f"mask_decoder_config.layer_norm_eps={m['layer_norm_eps']!r} (segany: {DECODER_LN_EPS})")
    if m["iou_head_depth"] < 2:
        bad.append(f"mask_decoder_config.iou_head_depth={m['iou_head_depth']} (SamModel builds 2 layers below 2)")
    if bad:
        raise CheckpointError(f"{where}: a SamModel setting segany's SAM cannot build: {'; '.join(bad)}")
    return {
        "embed_dim": v["hidden_size"],
        "depth": v["num_hidden_layers"],
        "num_heads": v["num_attention_heads"],
        "global_attn_indexes": list(v["global_attn_indexes"]),
        "img_size": img,
        "patch_size": patch,
        "window_size": v["window_size"],
        "prompt_embed_dim": d,
        "mask_in_chans": p["mask_input_channels"],
        "decoder_depth": m["num_hidden_layers"],
        "decoder_heads": m["num_attention_heads"],
        "decoder_mlp_dim": m["mlp_dim"],
        "num_multimask_outputs": m["num_multimask_outputs"],
        "iou_head_depth": m["iou_head_depth"],
        "iou_head_hidden_dim": m["iou_head_hidden_dim"],
        "text_embed_dim": 0,
    }


# ----------------------------------------------------------------- files


def read_safetensors(path) -> Dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (data by construction: no code in the format)."""
    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the safetensors file {os.fspath(path)!r}: {e}") from e


def is_hf_dir(path) -> bool:
    """A directory with a `config.json` and no DCP `.metadata` (a sharded training checkpoint)."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, HF_CONFIG))
        and not os.path.exists(os.path.join(path, ".metadata"))
    )


def _weight_files(path: str) -> list:
    index = os.path.join(path, HF_INDEX)
    if os.path.isfile(os.path.join(path, HF_WEIGHTS)):
        return [os.path.join(path, HF_WEIGHTS)]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read the shard index {index!r}: {e}") from e
        return [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{path!r}: a SamModel directory holds {HF_WEIGHTS} or {HF_INDEX}; found neither")


def read_hf(path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A transformers SamModel directory -> (segany-named weights, build_sam keywords). Every
    tensor of its architecture must be there, and no other."""
    from segany.modeling.sam import assemble  # the model package imports the checkpoint package
    from segany.modeling.variants import sam_config

    path = os.fspath(path)
    cfg_file = os.path.join(path, HF_CONFIG)
    try:
        with open(cfg_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_file!r}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file!r} holds a {type(config).__name__}, not a SamConfig dict")
    arch = sam_arch(config, repr(cfg_file))
    try:
        cfg = sam_config("vit_b", **arch)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file!r}: {e}") from e
    files = _weight_files(path)
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))
    with torch.device("meta"):
        expected = set(to_hf(assemble(cfg).state_dict(), cfg))
    given = set(tensors) | ({TIED[1]} if TIED[0] in tensors else set())
    missing, unexpected = sorted(expected - given), sorted(given - expected - {TIED[0]})
    if missing or unexpected:
        where = files[0] if len(files) == 1 else f"{path!r} ({len(files)} shards)"
        found = (("missing", missing), ("unexpected", unexpected))
        raise CheckpointError(
            f"{where}: not the SamModel of {cfg_file}: "
            + "; ".join(f"{len(ks)} {t} tensor(s) {ks[:10]}" for t, ks in found if ks)
        )
    return from_hf(tensors, cfg, path), arch
