"""Activation checkpointing (--train.activation-checkpointing): each block's activations are
recomputed in backward instead of kept (Chen et al. 2016, "Training deep nets with sublinear
memory cost"), torch.utils.checkpoint per block; the loss is the same."""

from __future__ import annotations

import torch


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Recompute every block of `model` (a classifier's body's) in backward; returns how many.
    Each block's forward is replaced by one that runs it under torch.utils.checkpoint while
    training (non-reentrant: keyword arguments work, and dropout's RNG is replayed, so the
    recomputation draws the same masks); the modules and state-dict keys are unchanged."""
    from .fsdp import blocks_of
    n = 0
    for block in blocks_of(model):
        if getattr(block, "_pretune_checkpointed", False):
            continue
        fwd = block.forward

        def forward(*args, _fwd=fwd, _block=block, **kwargs):
            if not (_block.training and torch.is_grad_enabled()) or kwargs.get("cache") is not None:
                return _fwd(*args, **kwargs)
            from torch.utils.checkpoint import checkpoint
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._pretune_checkpointed = True
        n += 1
    return n
