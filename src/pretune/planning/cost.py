"""Compute and cost from a config alone: parameters, FLOPs, PF-days, devices, dollars, kWh, MFU.

Nothing here allocates a weight: counting is `config.count_params` (closed
form), so a 1.8T-parameter config costs in microseconds. The formulas, with
their sources (the derivations are in docs/compute.md):

  training FLOPs   C = 6·N·D  +  12·L·T·d_attn·D
      6·N·D: a forward pass costs 2 FLOPs per parameter per token (one
      multiply-add), the backward pass twice that (Kaplan et al. 2020, sec. 2.1;
      Brown et al. 2020, app. D). N here is what a token multiplies through:
      the active non-embedding weights plus the output projection (tied or
      not; the input lookup costs nothing).
      12·L·T·d_attn: attention's two context-sized matmuls, QKᵀ and A·V, cost
      2·T·d_attn FLOPs each per token per layer forward, ×3 for training
      (Chowdhery et al. 2022, PaLM, app. B, the MFU convention). Kaplan's
      table 1 has half (6·L·T·d per token) because a causal token sees T/2
      keys on average; we follow PaLM, as MFU figures do.
  inference        2·N_active + 4·L·c·d_attn  per generated token at context c.
  memory           weights + gradients + Adam (m, v) by precision (Rajbhandari
      et al. 2020, ZeRO, sec. 3.1: 16 bytes/parameter in mixed precision), and
      activations per token per layer 34·d + 5·a·T bytes with 16-bit
      activations (Korthikanti et al. 2022, sec. 4.1).

Units: 1 PF-day = 1e15 FLOP/s × 86,400 s = 8.64e19 FLOPs (Brown et al. 2020).
"""

from __future__ import annotations

import json as _json
import math
from pathlib import Path
from typing import Any

from ..config.model import ModelConfig
from ..config.presets import PRESETS, preset
from ..errors import PretuneError
from ..hardware.peak import get_hardware
from ..hardware.table import Hardware
from ..models.counting import count_params, inference_flops_per_token, training_flops
from .fit import fit


PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day


SECONDS_PER_DAY = 86400.0


MFU_PLAUSIBLE = 0.6  # above this, a claimed run is suspicious (PaLM reports 46%, MT-NLG ~30%)


# bytes per parameter of (weights, gradients, optimizer state) when training with Adam
TRAIN_STATE_BYTES = {
    # fp32 weights and gradients, Adam m and v in fp32
    "fp32": (4, 4, 8),
    # mixed precision (ZeRO sec. 3.1): 16-bit weights and gradients; fp32 master copy, m and v (K = 12)
    "bf16": (2, 2, 12),
    "fp16": (2, 2, 12),
}


INFERENCE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def _activation_bytes_per_token_layer(cfg: ModelConfig, T: int, flash: bool) -> float:
    """Korthikanti et al. 2022 sec. 4.1: per layer, per token, 16-bit activations, no parallelism:
    attention 11·d + 5·a·T (the T×T scores, softmax, dropout mask), MLP 19·d, norms 4·d = 34·d + 5·a·T.
    The MLP's 16·d of it are its two 4d-wide tensors (GELU input, second matmul input), scaled here
    to the width a token actually passes through (top-k experts, SwiGLU's third tensor).
    With fused (flash) attention the 5·a·T term is not stored."""
    d = cfg.d_model
    if cfg.n_expert:
        ff = cfg.top_k * cfg.expert_ffn_dim + (cfg.ffn_dim if cfg.shared_expert else 0)
    else:
        ff = cfg.ffn_dim
    per_ff = 6 if cfg.mlp == "swiglu" else 4
    b = 18 * d + per_ff * ff
    if not flash:
        b += 5 * cfg.n_head * T
    return b


def memory(cfg: ModelConfig, precision: str = "bf16", seq_len: int | None = None) -> dict[str, Any]:
    """Bytes: training states (weights, grads, Adam) by precision; activations and KV cache per token."""
    if precision not in TRAIN_STATE_BYTES:
        raise PretuneError(f"unknown training precision '{precision}'", None,
                           f"use one of {', '.join(TRAIN_STATE_BYTES)}")
    p = count_params(cfg)
    N = p["total"]  # every expert needs its weights and optimizer state
    w, g, o = TRAIN_STATE_BYTES[precision]
    T = seq_len or cfg.max_seq_len
    scale = 2.0 if precision == "fp32" else 1.0  # the paper's figures are for 16-bit activations
    layers = {flash: cfg.n_layer * _activation_bytes_per_token_layer(cfg, T, flash) * scale
              for flash in (False, True)}
    logits = 4.0 * cfg.padded_vocab_size if cfg.lm_head else 0.0  # fp32 logits for the loss
    kv_bytes = INFERENCE_BYTES["bf16"] if precision != "fp32" else 4
    return {
        "precision": precision,
        "bytes_per_param": w + g + o,
        "weights": N * w, "gradients": N * g, "optimizer": N * o, "train_states": N * (w + g + o),
        "activations_per_token": layers[False] + logits,
        "activations_per_token_flash": layers[True] + logits,
        "seq_len": T,
        "inference_weights": {k: N * v for k, v in INFERENCE_BYTES.items()},
        "kv_cache_per_token": 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * kv_bytes,
    }


# --------------------------------------------------------------------------
# FLOPs -> time, money, energy (and back)
# --------------------------------------------------------------------------

def pf_days(flops: float) -> float:
    return flops / PF_DAY


def flops_from_pf_days(pfd: float) -> float:
    return pfd * PF_DAY


def device_seconds(flops: float, peak_flops: float, mfu: float = 1.0) -> float:
    """Seconds one device needs at `mfu` of its peak."""
    return flops / (peak_flops * mfu)


def wall_clock_days(flops: float, devices: int, peak_flops: float, mfu: float) -> float:
    return device_seconds(flops, peak_flops, mfu) / devices / SECONDS_PER_DAY


def implied_mfu(flops: float, devices: int, days: float, peak_flops: float) -> float:
    """The utilisation a claim 'C FLOPs on `devices` in `days`' needs."""
    return flops / (devices * peak_flops * days * SECONDS_PER_DAY)


def mfu_flag(mfu: float) -> str | None:
    """None if plausible; otherwise why not."""
    if mfu > 1.0:
        return f"impossible: MFU {mfu:.0%} exceeds the hardware's peak"
    if mfu > MFU_PLAUSIBLE:
        return f"implausible: MFU {mfu:.0%} > {MFU_PLAUSIBLE:.0%} (large runs report 30-50%)"
    return None


def dollars(device_hours: float, usd_per_device_hour: float | None = None,
            usd_per_instance_hour: float | None = None, devices_per_instance: int = 8) -> float | None:
    """Cost at a per-device or a per-instance hourly price (None if neither is given)."""
    if usd_per_instance_hour is not None:
        return device_hours / devices_per_instance * usd_per_instance_hour
    if usd_per_device_hour is not None:
        return device_hours * usd_per_device_hour
    return None


def energy_kwh(device_hours: float, watts: float, pue: float = 1.1) -> float:
    """kWh at the wall: device power × hours × the data centre's PUE (Patterson et al. 2021)."""
    return device_hours * watts / 1000.0 * pue


def energy_cost(kwh: float, usd_per_kwh: float) -> float:
    return kwh * usd_per_kwh


# --------------------------------------------------------------------------
# A plan: one model, one token budget, one cluster
# --------------------------------------------------------------------------

def load_model(spec: str | Path | ModelConfig) -> ModelConfig:
    """A run directory, a preset name, or a model/run config file (JSON or YAML): runs/resolve.py."""
    from ..runs.resolve import resolve_model_config
    return resolve_model_config(spec, where="pretune cost")


def plan(cfg: ModelConfig, tokens: float, hardware: str | Hardware = "a100", devices: int = 1,
         mfu: float | None = 0.4, days: float | None = None, precision: str | None = None,
         seq_len: int | None = None, usd_per_device_hour: float | None = None,
         usd_per_instance_hour: float | None = None, devices_per_instance: int = 8,
         pue: float = 1.1, usd_per_kwh: float | None = None, power_w: float | None = None,
         context: int | None = None, micro_batch: int = 1,
         activation_checkpointing: bool = False) -> dict[str, Any]:
    """Everything `pretune cost` reports for one model, as a JSON-ready dict.

    Given `days`, the run length is fixed and the MFU it implies is reported (and flagged if
    implausible); otherwise the run length follows from `mfu`."""
    _check_positive("tokens", tokens)
    _check_positive("gpus", devices)
    hw = hardware if isinstance(hardware, Hardware) else get_hardware(hardware)
    dtype = precision or hw.default_dtype
    peak = hw.peak_for(dtype)
    try:
        params = count_params(cfg)
        fl = training_flops(cfg, tokens, seq_len)
        mem = memory(cfg, "fp32" if dtype in ("fp32", "tf32") else "bf16", seq_len)
        inf = inference_flops_per_token(cfg, context)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise PretuneError(f"cannot count model '{cfg.name}': {e}", None, "check its config fields")
    C = fl["total"]
    if days is not None:
        _check_positive("days", days)
        use_mfu = implied_mfu(C, devices, days, peak)
        wall = days
    else:
        use_mfu = 0.4 if mfu is None else mfu
        _check_mfu(use_mfu)
        wall = wall_clock_days(C, devices, peak, use_mfu)
    dev_days = wall * devices
    dev_hours = dev_days * 24
    watts = power_w if power_w is not None else hw.power_w
    kwh = energy_kwh(dev_hours, watts, pue) if watts else None
    return {
        "model": cfg.name,
        "params": {**params, "flop_params": fl["n"]},
        "tokens": tokens,
        "flops": {"six_nd": fl["six_nd"], "attention": fl["attention"], "total": C,
                  "per_token": fl["per_token"], "seq_len": fl["seq_len"]},
        "pf_days": pf_days(C),
        "hardware": hw.name, "precision": dtype, "peak_flops_per_device": peak,
        "devices": devices,
        "mfu": use_mfu, "mfu_given": days is None, "mfu_flag": mfu_flag(use_mfu),
        "device_days": dev_days, "wall_clock_days": wall,
        "usd": dollars(dev_hours, usd_per_device_hour, usd_per_instance_hour, devices_per_instance),
        "energy_kwh": kwh, "pue": pue,
        "energy_usd": energy_cost(kwh, usd_per_kwh) if (kwh is not None and usd_per_kwh is not None) else None,
        "memory_bytes": {k: mem[k] for k in ("bytes_per_param", "train_states", "weights", "gradients",
                                             "optimizer", "activations_per_token",
                                             "activations_per_token_flash", "kv_cache_per_token")},
        "train_states_per_device_sharded": mem["train_states"] / devices,
        "fits": fit(mem, cfg, hw.memory_gb * 1e9 if hw.memory_gb else None, devices, micro_batch,
                    activation_checkpointing),
        "inference_flops_per_token": inf,
    }


def _check_positive(name: str, v) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise PretuneError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}", None,
                           f"e.g. --{name.replace('_', '-')} {'300e9' if name == 'tokens' else '8'}")


def _check_mfu(v) -> None:
    if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1:
        raise PretuneError(f"--mfu must be in (0, 1], got {v!r}", None,
                           "give a fraction of the peak, e.g. --mfu 0.4 (40%)")
