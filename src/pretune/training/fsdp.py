"""FSDP2 (`torch.distributed.fsdp.fully_shard`): every block its own unit, then the root, with a
mixed-precision policy from --train.precision (docs/distributed.md)."""

from __future__ import annotations

import torch


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Transformer's blocks (a classifier's are its body's)."""
    body = getattr(model, "body", model)
    return list(getattr(body, "blocks", []))


def shard(model: torch.nn.Module, tc) -> torch.nn.Module:
    """Shard `model` in place over the process group. Parameters are gathered in the compute dtype
    (bf16 / fp16, or fp32) and gradients reduced in fp32 (MixedPrecisionPolicy, as torchtitan
    does). The root keeps its parameters gathered after forward (reshard_after_forward=False):
    the losses use the output layer (tied to W_e) outside the model's forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks_of(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model
