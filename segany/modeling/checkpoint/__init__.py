"""Checkpoints in and out, in one place:

    read_checkpoint(path, trust=False) -> Checkpoint     a train.py .ckpt, an FSDP directory, a
                                                         SAM .pth or .safetensors, or a transformers
                                                         SamModel directory: weights + architecture (read.py)
    load_model(checkpoint, model_cfg, trust_checkpoint=False) -> (Sam, description)    (load.py)
    save_official(model, path), export(checkpoint, out)  the release's .pth + <name>.json (write.py);
                                                         export(..., format="safetensors" | "hf"): the
                                                         same weights as .safetensors, or a SamModel directory
    to_hf / from_hf, hf_config / sam_arch                segany <-> transformers.SamModel key names and
                                                         architecture, as data (hf.py)
    torch_load(path, trust=False), CheckpointError       the trust rule: a checkpoint is data (trust.py)
    save_with_manifest(obj, path), write_manifest(dir), verify_checkpoint(path)
                                                         sizes + hashes of its files (manifest.py)

build_sam(checkpoint=...) builds through load.model_of; mae.py is the encoder's MAE init and
infer.py the architecture of a state dict that stores none. Writing training checkpoints
atomically and resuming from them are Lightning plugins: segany/training/checkpointing.py.
"""

from segany.modeling.checkpoint.load import load_model, untrained_like
from segany.modeling.checkpoint.mae import load_mae_encoder
from segany.modeling.checkpoint.manifest import save_with_manifest, verify_checkpoint, write_manifest
from segany.modeling.checkpoint.read import Checkpoint, read_checkpoint, to_official
from segany.modeling.checkpoint.trust import CheckpointError, torch_load
from segany.modeling.checkpoint.write import architecture, export, save_official

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "architecture",
    "export",
    "load_mae_encoder",
    "load_model",
    "read_checkpoint",
    "save_official",
    "save_with_manifest",
    "to_official",
    "torch_load",
    "untrained_like",
    "verify_checkpoint",
    "write_manifest",
]
