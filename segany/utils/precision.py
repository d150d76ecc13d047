"""One precision vocabulary for every entry point: ``fp32``, ``bf16`` or ``auto``.

``train.py precision=...``, ``evaluate.py precision=...``, ``python -m segany.engine --precision``,
``SamPredictor(precision=...)`` and ``SamAutomaticMaskGenerator(precision=...)`` all take these
three words. ``bf16`` means torch.autocast to bfloat16 on the device (Lightning's ``bf16-mixed`` in
training: fp32 master weights and optimiser state); ``fp32`` is plain float32 (the release's
numbers); ``auto`` picks bf16 where the device has bf16 units and fp32 elsewhere, and logs which
and why:

- CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later).
- CPU: AVX512-BF16 or AMX tiles (``torch.cpu._is_avx512_bf16_supported`` /
  ``_is_amx_tile_supported``, what oneDNN dispatches on). A bf16 matmul there runs about twice
  as fast as fp32; on CPUs without them (e.g. Zen 3) bf16 is emulated and several times slower.
"""

from __future__ import annotations

import logging
from typing import Union

import torch

log = logging.getLogger("segany")

PRECISIONS = ("fp32", "bf16", "auto")
LIGHTNING = {"fp32": "32-true", "bf16": "bf16-mixed"}  # Lightning's Trainer(precision=...) names
_said: set = set()


def bf16_units(device: Union[str, torch.device]) -> tuple[bool, str]:
    """(whether ``device`` has bf16 arithmetic units, the reason in words)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} {'has' if ok else 'has no'} bf16 support"
    if kind == "cpu":
        units = [
            n
            for n, f in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
            if getattr(torch.cpu, f, lambda: False)()
        ]
        return bool(units), f"CPU has {' and '.join(units)}" if units else "CPU has neither AVX512-BF16 nor AMX"
    return False, f"no bf16 rule for device type {kind!r}"


def check_precision(precision: str, where: str = "precision") -> str:
    """``precision`` if it is one of PRECISIONS, else a ValueError naming ``where`` and the word to use."""
    p = str(precision)
    if p in PRECISIONS:
        return p
    hint = {
        "32-true": "fp32",
        "32": "fp32",
        "float32": "fp32",
        "bf16-mixed": "bf16",
        "bfloat16": "bf16",
        "bf16-true": "bf16",
    }.get(p)
    use = f"; use {where}={hint}" if hint else ""
    raise ValueError(f"{where}={p!r}: expected one of {', '.join(PRECISIONS)}{use}")


def resolve_precision(precision: str, device: Union[str, torch.device], where: str = "precision") -> str:
    """ "fp32" or "bf16" for ``device``: ``precision`` itself, or what ``auto`` picks there (logged once)."""
    p = check_precision(precision, where)
    if p != "auto":
        return p
    ok, why = bf16_units(device)
    picked = "bf16" if ok else "fp32"
    if (picked, why) not in _said:
        _said.add((picked, why))
        log.info("%s=auto: %s (%s)", where, picked, why)
    return picked


def accelerator_device(accelerator: str) -> str:
    """The device type a Lightning ``accelerator`` name runs on ("auto": CUDA when there is one)."""
    a = str(accelerator)
    if a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def trainer_precision(precision: str, accelerator: str = "auto") -> str:
    """The ``trainer.precision`` resolver: segany's word -> Lightning's ("32-true" / "bf16-mixed")."""
    return LIGHTNING[resolve_precision(precision, accelerator_device(accelerator))]


def param_dtype(trainer_precision: str):
    """The FSDP2 ``param_dtype`` resolver: "bf16" under Lightning's bf16 precisions, else None (fp32)."""
    return "bf16" if str(trainer_precision).startswith("bf16") else None
