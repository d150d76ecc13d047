"""SAM -> two ONNX files, checked against the PyTorch model before they are kept.

``export_onnx(model, OUT)`` writes the directory OUT with

    encoder.onnx  image (1, 3, h, w) float32 RGB on the 0-255 scale, already resized by
                  ResizeLongestSide (max(h, w) = S = img_size; h, w dynamic) -> image_embeddings
                  (1, C, S/16, S/16), C = prompt_embed_dim (256 in the release). Normalisation
                  and zero padding are in the graph.
    decoder.onnx  the release's SamOnnxModel interface (segment_anything/utils/onnx.py):
                  image_embeddings (1, C, S/16, S/16), point_coords (1, P, 2) float32 xy in the
                  resized frame, point_labels (1, P) float32 (-1 pad, 0 neg, 1 pos, 2/3 box
                  corners; P dynamic), mask_input (1, 1, S/4, S/4), has_mask_input (1,),
                  orig_im_size (2,) float32 (H, W) -> masks (1, K, H, W) logits, iou_predictions
                  (1, K), low_res_masks (1, K, S/4, S/4). K = 4 (every mask token: 0 is the
                  single-mask output, 1..3 the multimask ones), or K = 1 with return_single_mask
                  (the release's choice: token 0 from 3 points up, else the best of 1..3).

Each file carries its architecture in its metadata (``segany.*`` keys: img_size, mask threshold,
return_single_mask, weights dtype), which ``segany.inference.OnnxPredictor`` reads. Torch's ONNX
exporter (``torch.onnx.export(dynamo=True)``), opset 18 (``OPSET``). ``fp16=True`` stores the weight
tensors (those of ``FP16_MIN_NUMEL`` values or more) as float16, each followed by a Cast to float32:
half the file, computed in float32 on every execution provider. The text token (segany's CLIP
prompt) and HQ-SAM are not exported. A model of over EXTERNAL_DATA_BYTES keeps its weights in
``<file>.data`` beside the file (protobuf's 2 GB limit).

Every export is checked unless ``check=False`` (`check_onnx`): onnxruntime (CPU) against the
PyTorch ``SamPredictor`` on a few images (``check_images``; a synthetic scene without) and prompts
(1 point, 3 points, a box, a box + a point + a mask input; multimask and single-mask outputs).
Past ``TOLERANCES`` (max |delta| of the embedding, the mask logits and IoU predictions; the
smallest IoU of the thresholded masks) it raises `OnnxCheckError` and nothing is left in OUT:
the files are written to a temporary directory in OUT and moved into place only once checked.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from segany.inference.onnx_predictor import DECODER_FILE, ENCODER_FILE, OnnxPredictor
from segany.inference.predictor import SamPredictor
from segany.modeling.mask_decoder import MaskDecoder

log = logging.getLogger(__name__)

OPSET = 18
FP16_MIN_NUMEL = 1024  # float tensors with fewer values (biases, norms, scalars) stay float32
EXTERNAL_DATA_BYTES = 1_800_000_000  # larger models keep their weights in <file>.data (protobuf: 2 GB)
# defaults of the check: max |delta| (embedding, upsampled and low-res mask logits, IoU
# predictions) and the smallest IoU between PyTorch's and ONNX's thresholded masks
TOLERANCES = {"fp32": {"atol": 1e-2, "min_iou": 0.99}, "fp16": {"atol": 0.25, "min_iou": 0.95}}


class OnnxCheckError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch model within the tolerances."""


# ----------------------------------------------------------------------------- the graphs
class EncoderOnnx(nn.Module):
    """(1, 3, h, w) resized 0-255 RGB -> (1, 256, S/16, S/16): Sam.preprocess + image encoder."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(self.sam.preprocess(image))


class DecoderOnnx(nn.Module):
    """The release's SamOnnxModel on segany's modules: prompt encoder (points as tokens, the dense
    mask prompt blended by has_mask_input), mask decoder, upsampling to orig_im_size."""

    def __init__(self, sam: nn.Module, return_single_mask: bool = False) -> None:
        super().__init__()
        self.sam = sam
        self.img_size = sam.image_encoder.img_size
        self.return_single_mask = return_single_mask

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size):
        pe = self.sam.prompt_encoder
        labels = point_labels.long()  # (1, P)
        pos = pe.pe_layer.forward_with_coords(point_coords + 0.5, pe.input_image_size)  # (1, P, C)
        # row = label + 1: padding, negative, positive, box top-left, box bottom-right (no text row)
        table = torch.cat([pe.not_a_point_embed.weight] + [e.weight for e in pe.point_embeddings])  # (5, C)
        sparse = torch.where((labels != -1).unsqueeze(-1), pos, torch.zeros_like(pos)) + table[labels + 1]
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask  # (1, C, h, w)
        low_res, iou = self.sam.mask_decoder.predict_masks(image_embeddings, pe.get_dense_pe(), sparse, dense)
        if self.return_single_mask:  # the release's select_masks: token 0 from 3 points (padding included) up
            score = iou + (point_coords.shape[1] - 2.5) * iou.new_tensor([1000.0, 0.0, 0.0, 0.0])
            best = score.argmax(dim=1)  # (1,)
            low_res, iou = low_res[:, best], iou[:, best]  # (1, 1, 4h, 4w), (1, 1)
        s = self.img_size
        masks = F.interpolate(low_res, (s, s), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        resized = torch.floor(size * (s / size.max()) + 0.5).to(torch.int64)  # ResizeLongestSide's (h, w)
        rh, rw = resized[0].item(), resized[1].item()
        torch._check(rh > 0)
        torch._check(rw > 0)
        torch._check(rh <= s)
        torch._check(rw <= s)
        masks = masks[..., :rh, :rw]
        hw = orig_im_size.to(torch.int64)
        h, w = hw[0].item(), hw[1].item()
        torch._check(h > 0)
        torch._check(w > 0)
        masks = F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)
        return masks, iou, low_res


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """aten.scaled_dot_product_attention for the exporter at any rank: torchlib's translation takes
    4-D tensors only, and timm's SAM attention calls it on (B*heads, N, c)."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

    if len(query.shape) == 4 or is_causal or enable_gqa:
        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    r = len(query.shape)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    scores = op.MatMul(op.Mul(query, op.CastLike(scale, query)), op.Transpose(key, perm=[*range(r - 2), r - 1, r - 2]))
    if attn_mask is not None:  # timm passes the rel-pos bias as a float mask
        scores = op.Add(scores, attn_mask)
    return op.MatMul(op.Softmax(scores, axis=-1), value)


def _export(module, args: tuple, names: tuple, dynamic: tuple, path: Path, metadata: dict, fp16: bool, optimize: bool):
    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # P shared by two inputs
        program = torch.onnx.export(
            module,
            args,
            input_names=list(names[0]),
            output_names=list(names[1]),
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            custom_translation_table={torch.ops.aten.scaled_dot_product_attention.default: _sdpa},
            optimize=optimize,
            verbose=False,
        )
    nbytes = sum(p.numel() * 4 for p in module.parameters())
    program.save(str(path), external_data=nbytes > EXTERNAL_DATA_BYTES)
    model = onnx.load(str(path))
    if fp16:
        _weights_to_fp16(model)
    for k, v in metadata.items():
        model.metadata_props.add(key=f"segany.{k}", value=str(v))
    big = nbytes // (2 if fp16 else 1) > EXTERNAL_DATA_BYTES
    for f in path.parent.glob(path.name + ".data"):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)


def _weights_to_fp16(model) -> None:
    """Float32 initializers of FP16_MIN_NUMEL values or more -> float16 + a Cast to float32 in front
    of their users (same names downstream: the graph is otherwise unchanged)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < FP16_MIN_NUMEL:
            continue
        name = init.name
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name + "_fp16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT, name=name + "_cast"))
    for i, node in enumerate(casts):  # nodes first: the graph stays topologically sorted
        graph.node.insert(i, node)


def export_encoder(sam: nn.Module, path: Path, fp16: bool = False, optimize: bool = True) -> None:
    s = sam.image_encoder.img_size
    example = torch.full((1, 3, s, s * 3 // 4), 128.0)
    dims = {2: torch.export.Dim("height", min=2, max=s), 3: torch.export.Dim("width", min=2, max=s)}
    meta = {"part": "encoder", "img_size": s, "weights": "fp16" if fp16 else "fp32"}
    _export(
        EncoderOnnx(sam).eval(), (example,), (["image"], ["image_embeddings"]), ({**dims},), path, meta, fp16, optimize
    )


def export_decoder(
    sam: nn.Module, path: Path, return_single_mask: bool = False, fp16: bool = False, optimize: bool = True
) -> None:
    pe = sam.prompt_encoder
    h, w = pe.image_embedding_size
    c = pe.embed_dim
    example = (
        torch.randn(1, c, h, w),
        torch.tensor([[[10.0, 20.0], [30.0, 40.0], [0.0, 0.0]]]),
        torch.tensor([[1.0, 0.0, -1.0]]),
        torch.randn(1, 1, 4 * h, 4 * w),
        torch.tensor([1.0]),
        torch.tensor([480.0, 640.0]),
    )
    inputs = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
    outputs = ["masks", "iou_predictions", "low_res_masks"]
    points = torch.export.Dim("num_points", min=1, max=4096)
    dynamic = ({}, {1: points}, {1: points}, {}, {}, {})
    meta = {
        "part": "decoder",
        "img_size": sam.image_encoder.img_size,
        "mask_threshold": float(sam.mask_threshold),
        "return_single_mask": int(return_single_mask),
        "weights": "fp16" if fp16 else "fp32",
    }
    module = DecoderOnnx(sam, return_single_mask).eval()
    _export(module, example, (inputs, outputs), dynamic, path, meta, fp16, optimize)


# ----------------------------------------------------------------------------- the check
@dataclass
class OnnxReport:
    """What an export wrote and how close it came to PyTorch."""

    out_dir: str
    files: Dict[str, int] = field(default_factory=dict)  # name -> bytes
    export_s: float = 0.0
    check_s: float = 0.0
    embed_max_abs: float = float("nan")  # max |delta| of the image embedding
    logits_max_abs: float = float("nan")  # ... of the mask logits (original size and low-res)
    iou_pred_max_abs: float = float("nan")  # ... of the predicted IoUs
    mask_iou_min: float = float("nan")  # smallest IoU of the thresholded masks
    checked: int = 0  # masks compared

    def summary(self) -> str:
        return (
            f"max |delta| embedding {self.embed_max_abs:.3g}, mask logits {self.logits_max_abs:.3g}, "
            f"IoU predictions {self.iou_pred_max_abs:.3g}; mask IoU >= {self.mask_iou_min:.4f} ({self.checked} masks)"
        )


def synthetic_image(seed: int = 0, size=(192, 256)) -> np.ndarray:
    """A (H, W, 3) uint8 synthetic scene (segany.data.scenes), the check's image when none is given."""
    from segany.data.scenes import make_scene

    return make_scene(np.random.default_rng(seed), size[0], size[1], n_objects=4)[0]


def read_image(path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise OnnxCheckError(f"check image {str(path)!r}: cannot read it ({e})") from e


def check_prompts(h: int, w: int) -> List[dict]:
    """A few prompts for an (h, w) image: 1 point, 3 points, a box, a box + a point (+ mask input)."""
    return [
        {"point_coords": np.array([[w / 2, h / 2]]), "point_labels": np.array([1])},
        {"point_coords": np.array([[w / 3, h / 3], [2 * w / 3, 2 * h / 3], [w / 2, h / 5]]), "point_labels": [1, 1, 0]},
        {"box": np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4])},
        {"box": np.array([w / 8, h / 6, w / 2, 5 * h / 6]), "point_coords": np.array([[w / 4, h / 2]]),
         "point_labels": np.array([1]), "mask_input": "previous"},
    ]  # fmt: skip


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def check_onnx(
    sam: nn.Module,
    out_dir,
    images: Optional[Sequence[np.ndarray]] = None,
    atol: Optional[float] = None,
    min_iou: Optional[float] = None,
    fp16: bool = False,
) -> OnnxReport:
    """Compare the ONNX files in `out_dir` (onnxruntime, CPU) with `sam` (SamPredictor, fp32) on
    `images` (default: one synthetic scene) and `check_prompts`; raise OnnxCheckError past
    `atol` / `min_iou` (default: TOLERANCES["fp16" if fp16 else "fp32"])."""
    tol = TOLERANCES["fp16" if fp16 else "fp32"]
    atol = tol["atol"] if atol is None else atol
    min_iou = tol["min_iou"] if min_iou is None else min_iou
    images = [synthetic_image()] if not images else images
    ref, onnx = SamPredictor(sam.eval()), OnnxPredictor(out_dir)
    single = onnx.return_single_mask
    report = OnnxReport(str(out_dir))
    emb, logit, iou_d, ious = [], [], [], []
    for image in images:
        ref.set_image(image)
        onnx.set_image(image)
        emb.append(float(np.abs(ref.get_image_embedding().cpu().numpy() - onnx.get_image_embedding()).max()))
        previous = None
        for prompt in check_prompts(*image.shape[:2]):
            prompt = dict(prompt)
            if prompt.get("mask_input") == "previous":
                prompt["mask_input"] = previous
            for multimask in (False,) if single else (True, False):
                if single:  # the file holds the release's choice; the reference: all tokens, same choice
                    r = _reference_single(ref, prompt)
                else:
                    r = ref.predict(**prompt, multimask_output=multimask, return_logits=True)
                o = onnx.predict(**prompt, multimask_output=multimask, return_logits=True)
                logit += [float(np.abs(r[0] - o[0]).max()), float(np.abs(r[2] - o[2]).max())]
                iou_d.append(float(np.abs(r[1] - o[1]).max()))
                thr = onnx.mask_threshold
                ious += [_mask_iou(a > thr, b > thr) for a, b in zip(r[0], o[0])]
            previous = r[2][np.argmax(r[1])][None]  # (1, 4h, 4w) low-res logits of the best mask
    report.embed_max_abs, report.logits_max_abs = max(emb), max(logit)
    report.iou_pred_max_abs, report.mask_iou_min, report.checked = max(iou_d), min(ious), len(ious)
    bad = [
        f"{what} {value:.4g} > {atol:g}"
        for what, value in (
            ("max |delta| embedding", report.embed_max_abs),
            ("max |delta| mask logits", report.logits_max_abs),
            ("max |delta| IoU predictions", report.iou_pred_max_abs),
        )
        if not value <= atol  # NaN fails too
    ]
    if not report.mask_iou_min >= min_iou:
        bad.append(f"mask IoU {report.mask_iou_min:.4f} < {min_iou:g}")
    if bad:
        raise OnnxCheckError(
            f"the ONNX files do not match the PyTorch model ({'fp16' if fp16 else 'fp32'} weights, "
            f"{len(images)} image(s)): {'; '.join(bad)}. {report.summary()}"
        )
    return report


def _reference_single(ref: SamPredictor, prompt: dict):
    """The release's return_single_mask choice, computed with PyTorch (every mask token)."""
    r_multi = ref.predict(**prompt, multimask_output=True, return_logits=True)
    r_one = ref.predict(**prompt, multimask_output=False, return_logits=True)
    n_points = (0 if prompt.get("point_coords") is None else len(prompt["point_coords"])) + (
        1 if prompt.get("box") is None else 2
    )
    if n_points > 2.5:
        return r_one
    best = int(np.argmax(r_multi[1]))
    return r_multi[0][best : best + 1], r_multi[1][best : best + 1], r_multi[2][best : best + 1]


# ----------------------------------------------------------------------------- the export
def _written(d: Path) -> List[Path]:
    """The files of an export in `d`: the two models and their external weights."""
    return [d / n for f in (ENCODER_FILE, DECODER_FILE) for n in (f, f + ".data") if (d / n).is_file()]


def check_model(sam: nn.Module) -> None:
    """What the ONNX graphs cover: the release's decoder and encoder (no HQ-SAM)."""
    if type(sam.mask_decoder) is not MaskDecoder or getattr(sam.image_encoder, "interm_index", None) is not None:
        raise ValueError(
            f"ONNX export covers SAM's own mask decoder, not {type(sam.mask_decoder).__name__} (HQ-SAM is not exported)"
        )


def export_onnx(
    sam: nn.Module,
    out_dir,
    *,
    fp16: bool = False,
    return_single_mask: bool = False,
    check: bool = True,
    check_images: Optional[Sequence] = None,
    atol: Optional[float] = None,
    min_iou: Optional[float] = None,
    optimize: bool = True,
) -> OnnxReport:
    """Write `ENCODER_FILE` and `DECODER_FILE` of `sam` into the directory `out_dir` (created;
    existing files of those names replaced), checked first (`check_onnx`, on `check_images`:
    paths or (H, W, 3) uint8 RGB arrays) unless check=False. On a failed check OnnxCheckError,
    and `out_dir` holds no ONNX file of this export."""
    check_model(sam)
    sam = sam.eval()
    out = Path(out_dir)
    images = [read_image(p) if isinstance(p, (str, os.PathLike)) else p for p in (check_images or [])]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out))
    try:
        t0 = time.perf_counter()
        export_encoder(sam, tmp / ENCODER_FILE, fp16=fp16, optimize=optimize)
        export_decoder(sam, tmp / DECODER_FILE, return_single_mask=return_single_mask, fp16=fp16, optimize=optimize)
        export_s = time.perf_counter() - t0
        report = OnnxReport(str(out))
        if check:
            t0 = time.perf_counter()
            try:
                report = check_onnx(sam, tmp, images, atol=atol, min_iou=min_iou, fp16=fp16)
            except OnnxCheckError as e:  # an earlier export's files would pass for this one's
                stale = _written(out)
                for f in stale:
                    f.unlink()
                removed = f" (removed the earlier {', '.join(f.name for f in stale)})" if stale else ""
                raise OnnxCheckError(f"{out}: {e} Nothing written{removed}.") from None
            report.check_s = time.perf_counter() - t0
            log.info("ONNX check passed (%s weights): %s", "fp16" if fp16 else "fp32", report.summary())
        report.out_dir, report.export_s = str(out), export_s
        for f in _written(out):  # e.g. an earlier export's external weights that this one has not
            if not (tmp / f.name).exists():
                f.unlink()
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            report.files[f.name] = (out / f.name).stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


# ----------------------------------------------------------------------------- the command line
def add_onnx_args(p) -> None:
    """The --format onnx options of `python -m segany.export`."""
    g = p.add_argument_group("--format onnx (OUT: a directory, receives encoder.onnx and decoder.onnx)")
    g.add_argument("--fp16", action="store_true", help="store the weights as float16 (computed in float32)")
    g.add_argument(
        "--return-single-mask",
        action="store_true",
        help="the decoder returns one mask (the release's choice) instead of all four mask tokens' masks",
    )
    g.add_argument(
        "--check-images", nargs="+", default=None, metavar="IMAGE", help="check on these (default: a synthetic scene)"
    )
    g.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch check")
    g.add_argument("--atol", type=float, default=None, help=f"check: max |delta| allowed (default {TOLERANCES})")
    g.add_argument("--min-iou", type=float, default=None, help="check: smallest mask IoU allowed (default as --atol)")
    g.add_argument(
        "--no-optimize",
        action="store_true",
        help="skip the exporter's graph optimisation (faster; onnxruntime optimises at load)",
    )


def run_onnx(a) -> int:
    """`python -m segany.export CKPT OUT --format onnx ...` (argparse namespace of add_onnx_args)."""
    import sys

    from segany.modeling.checkpoint import read_checkpoint
    from segany.modeling.checkpoint.load import model_of

    for name in ("onnx_ir", "onnxscript"):  # their INFO lines (every pass) drown the report
        logging.getLogger(name).setLevel(logging.WARNING)
    sam = model_of(read_checkpoint(a.checkpoint, prefix=a.prefix, trust=a.trust_checkpoint), a.variant)
    try:
        r = export_onnx(
            sam,
            a.out,
            fp16=a.fp16,
            return_single_mask=a.return_single_mask,
            check=not a.no_check,
            check_images=a.check_images,
            atol=a.atol,
            min_iou=a.min_iou,
            optimize=not a.no_optimize,
        )
    except (OnnxCheckError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r.files.items())
    print(f"wrote {r.out_dir}: {files} (opset {OPSET}, export {r.export_s:.1f} s)")
    if a.no_check:
        print("not checked (--no-check)")
    return 0
