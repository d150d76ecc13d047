"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for SAM, torchtitan style.

Units. A ViT-H block holds ~20M parameters and the encoder is 32 of them: one FSDP unit
per block keeps at most ~2 blocks unsharded at a time (the one computing and the one
prefetched) while each all-gather stays large enough to run at full bandwidth. The
training and evaluation code call `model.image_encoder`, `model.prompt_encoder` and
`model.mask_decoder(.predict_masks)` directly and never `Sam.forward`, so a unit on the
`Sam` root would never be all-gathered; instead each of the three parts is a root of its
own (the encoder's unit takes patch embedding, position embedding and neck). The decoder
(~4M parameters) and the prompt encoder run once per prompting round, long after the
encoder finished; they stay unsharded between rounds (`reshard_after_forward=False`, a
few MB) so the rounds do not repeat their all-gathers. `predict_masks` is registered as
an FSDP forward method so calling it all-gathers like `forward`.

Activation checkpointing, when asked, wraps each ViT block *before* sharding (the
recomputation sits inside the FSDP unit); non-reentrant, the kind that works with FSDP2.
State-dict keys do not change (the wrapper strips its `_checkpoint_wrapped_module.`).
Turn the encoder's own `grad_checkpointing` off when using it, or blocks recompute twice.

Mixed precision: parameters are all-gathered and used in `param_dtype` (bf16 halves the
traffic), gradients are reduce-scattered in `reduce_dtype` (fp32 keeps the mean exact);
the sharded master parameters and the optimiser state stay fp32. Two exceptions: the
prompt encoder (a few thousand parameters) computes in fp32, since FSDP would cast its
inputs, pixel coordinates, to bf16 (4 px steps at 1024); the decoder returns fp32 mask
logits and IoU predictions, so the losses never see bf16.

Lightning: use `pytorch_lightning.strategies.ModelParallelStrategy` with
`data_parallel_size` = world size and `tensor_parallel_size=1` (configs/strategy/fsdp.yaml)
and call `ShardingConfig(**cfg).apply(self.model, self.device_mesh["data_parallel"])` from
`LightningModule.configure_model`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

DType = Union[str, torch.dtype, None]


def _dtype(d: DType) -> Optional[torch.dtype]:
    """ "bfloat16" / "bf16" / "float32" / torch.bfloat16 / None -> torch.dtype | None."""
    if d is None or isinstance(d, torch.dtype):
        return d
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(d).lower(), str(d).lower()).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {d!r} (use 'bf16', 'fp32' or null)")
    return dtype


def shard_sam(
    model: nn.Module,
    *,
    mesh=None,
    param_dtype: DType = "bf16",
    reduce_dtype: DType = "float32",
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a segany `Sam` in place with FSDP2 and return it.

    mesh: a 1-D DeviceMesh over the data-parallel ranks (None: all ranks of the default
    process group). reshard_after_forward applies to the encoder blocks (False trades
    memory for one all-gather less per block in backward); the three part roots never
    reshard after forward (torchtitan's choice for roots; see the module docstring).
    """
    if is_sharded(model):
        raise ValueError("shard_sam: model is already sharded (configure_model ran twice?)")
    param_dtype, reduce_dtype = _dtype(param_dtype), _dtype(reduce_dtype)
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # prompt encoder in fp32: its inputs are pixel coordinates, which bf16 would round to 4-8 px
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    # decoder outputs (mask logits, IoU) in fp32 for the losses
    low_out32 = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, output_dtype=torch.float32)
    common = {"mesh": mesh}
    if cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy()

    blocks = model.image_encoder.blocks
    for i, block in enumerate(blocks):
        if activation_checkpointing and not isinstance(block, CheckpointWrapper):
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            blocks[i] = block
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=low, **common)
    fully_shard(model.image_encoder, reshard_after_forward=False, mp_policy=low, **common)
    fully_shard(model.prompt_encoder, reshard_after_forward=False, mp_policy=fp32, **common)
    fully_shard(model.mask_decoder, reshard_after_forward=False, mp_policy=low_out32, **common)
    register_fsdp_forward_method(model.mask_decoder, "predict_masks")
    return model


@dataclass
class ShardingConfig:
    """The `module.sharding` config node (configs/strategy/fsdp.yaml); `apply` is what
    `configure_model` calls with the strategy's data-parallel mesh."""

    param_dtype: Optional[str] = "bf16"
    reduce_dtype: Optional[str] = "float32"
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self):
        _dtype(self.param_dtype), _dtype(self.reduce_dtype)  # fail at config time, naming the value

    def apply(self, model: nn.Module, mesh=None) -> nn.Module:
        return shard_sam(model, mesh=mesh, **asdict(self))


def is_sharded(model: nn.Module) -> bool:
    """True once `shard_sam` (or any fully_shard) was applied to the model or a part of it."""
    return any(isinstance(m, FSDPModule) for m in model.modules())
