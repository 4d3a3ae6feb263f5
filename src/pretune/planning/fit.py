"""Does a training plan fit the device's memory, under DDP or FSDP, and which does it need?

Per device (bytes):
  DDP          the whole training state, 16 bytes per parameter in mixed precision (bf16 weights
               and gradients, fp32 master weights, Adam m and v: Rajbhandari et al. 2020, ZeRO,
               sec. 3.1; 4+4+8 in fp32), plus the activations of one micro-batch;
  FSDP         (ZeRO stage 3, fully_shard) the training state divided over the devices, plus the
               same activations (the one block gathered at a time is left out: ~1/L of the weights);
  activations  per token per layer 34·d + 5·a·T bytes with 16-bit activations, no parallelism
               (Korthikanti et al. 2022, sec. 4.1, eq. 1; planning/cost.py), x2 in fp32, plus the
               fp32 logits; with full activation checkpointing only each layer's input is kept,
               2·d bytes per token per layer (sec. 4.2: "2sbhL"), plus one layer's full set while
               it is recomputed.
Torch-free, like the rest of the planner.
"""

from __future__ import annotations

from typing import Any


def activation_bytes(mem: dict, cfg, micro_batch: int, checkpointing: bool = False) -> float:
    """Activations of one micro-batch of `micro_batch` sequences of mem["seq_len"] tokens."""
    tokens = micro_batch * mem["seq_len"]
    scale = 2.0 if mem["precision"] == "fp32" else 1.0
    logits = 4.0 * cfg.padded_vocab_size if cfg.lm_head else 0.0
    per_layer = (mem["activations_per_token"] - logits) / max(cfg.n_layer, 1)
    if not checkpointing:
        return tokens * mem["activations_per_token"]
    return tokens * (cfg.n_layer * 2 * cfg.d_model * scale + per_layer + logits)


def fit(mem: dict, cfg, device_bytes: float | None, devices: int, micro_batch: int = 1,
        checkpointing: bool = False) -> dict[str, Any]:
    """{"ddp", "fsdp": bytes per device, "device": bytes, "needs": "ddp" | "fsdp" | "neither" | None,
    "min_devices_fsdp": the fewest devices FSDP fits on (None if even one layer's share cannot)}."""
    act = activation_bytes(mem, cfg, micro_batch, checkpointing)
    ddp = mem["train_states"] + act
    fsdp = mem["train_states"] / devices + act
    out = {"ddp": ddp, "fsdp": fsdp, "activations": act, "device": device_bytes, "micro_batch": micro_batch,
           "activation_checkpointing": checkpointing, "needs": None, "min_devices_fsdp": None}
    if device_bytes:
        out["needs"] = "ddp" if ddp <= device_bytes else "fsdp" if fsdp <= device_bytes else "neither"
        room = device_bytes - act
        if room > 0:
            import math
            out["min_devices_fsdp"] = max(1, math.ceil(mem["train_states"] / room))
    return out
