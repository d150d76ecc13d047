"""Training checkpoint -> the release's SAM .pth (loadable by `segment_anything` and by
`segany.build_sam(checkpoint=...)`), with its architecture as `<name>.json` beside it.

    python -m segany.export runs/vit_h_sa1b_123/checkpoints/last.ckpt sam_vit_h.pth

--format safetensors writes the same release-named weights as OUT.safetensors (+ OUT.json);
--format hf a transformers SamModel directory OUT (config.json + model.safetensors) that
`transformers.SamModel.from_pretrained(OUT)` and `segany.build_sam(checkpoint=OUT)` load.
--format onnx a directory OUT with encoder.onnx and decoder.onnx (the release's ONNX decoder
interface) for `segany.inference.OnnxPredictor`, checked against the PyTorch model first
(segany/export/onnx_model.py; --fp16, --check-images, --no-check, --atol, --min-iou).

Reads whatever `segany.modeling.checkpoint.read_checkpoint` reads: a single-file Lightning
checkpoint, a sharded torch.distributed.checkpoint directory (FSDP2; only the model's tensors,
no process group), or a plain state_dict (release or segany names), as data; --trust-checkpoint
opts one trusted file out of that. The command line of `segany.modeling.checkpoint.export`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from segany.export.onnx_model import add_onnx_args, run_onnx
from segany.modeling.checkpoint import CheckpointError, export
from segany.modeling.checkpoint.write import FORMATS
from segany.utils.cli import add_checkpoint_args

__all__ = ["export", "main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m segany.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="Lightning .ckpt file, sharded checkpoint directory, or a state_dict .pth")
    p.add_argument("out", help="output .pth (release SAM format); the architecture goes to <name>.json beside it")
    p.add_argument("--prefix", default=None, help="key prefix before 'image_encoder.' (default: detected)")
    p.add_argument("--variant", default=None, help="check against build_sam(VARIANT) (default: the checkpoint's own)")
    p.add_argument(
        "--format",
        default="pth",
        choices=(*FORMATS, "onnx"),
        help="pth: the release's .pth (default); safetensors: the same weights as OUT.safetensors; "
        "hf: a transformers SamModel directory OUT; onnx: a directory OUT of two ONNX files",
    )
    add_checkpoint_args(p)
    add_onnx_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.format == "onnx":
            return run_onnx(a)
        export(
            a.checkpoint,
            a.out,
            prefix=a.prefix,
            variant=a.variant,
            trust_checkpoint=a.trust_checkpoint,
            format=a.format,
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
