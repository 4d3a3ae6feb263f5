#!/usr/bin/env python
"""One short GPU job: train the GPT-2 124M shape in bf16 and print tokens/s and MFU.

    python scripts/gpu_check.py                 # CUDA: 12 layers, d=768, B=16 x 1024, 40 steps
    python scripts/gpu_check.py --json out.json # also write the figures as JSON

MFU = achieved model FLOP/s / the device's dense bf16 peak (Chowdhery et al. 2022,
PaLM app. B). Model FLOPs per token are 6·N + 12·L·T·d (N: `models.counting.flop_params`,
the active non-embedding parameters plus the output projection, docs/compute.md; the
second term is attention's QK^T and AV); the peak is the hardware table's row for the GPU;
the 6·N-only figure, the one the CPU targets use, is printed too. The goal on an
H100 is at least 45%.

It runs pretune's own `Trainer.train_step` (fused AdamW, SDPA/flash attention,
bf16 autocast; `torch.compile` on by default on CUDA) on random tokens (the data
is not what is measured), times `--steps` steps after `--warmup` ones with one
synchronisation at each end, and reads the loss once. On CUDA it then runs one
more step under `torch.cuda.set_sync_debug_mode("error")`, which raises at any
operation that makes the host wait for the device: `sync_check` in the output is
"passed" (a step has no host sync) or "failed: <the error>".
Without a GPU it runs a few CPU steps of a small shape instead, against this
CPU's measured matmul peak (`pretune bench --peak`), so CI keeps it working.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def dense_bf16_peak(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak for a CUDA device name, e.g. 'NVIDIA H100 80GB HBM3': the
    hardware table's row for it (pretune.hardware.table, the one table), None for an unknown GPU."""
    from pretune.hardware.table import from_device_name

    hw = from_device_name(device_name)
    return hw.peak.get("bf16") if hw else None


def flop_counts(cfg, seq_len: int) -> tuple[int, float, float]:
    """(N, training FLOPs per token, the 6·N part alone) for a model config. N is the one N of 6ND,
    `pretune.models.counting.flop_params`: the weights a token multiplies through (a routed layer's
    top-k experts only, not all of them; the output projection; no embedding lookup tables)."""
    from pretune.models.counting import d_attn, flop_params

    n = flop_params(cfg)
    return (n, flops_per_token(n, cfg.n_layer, seq_len, d_attn(cfg)),
            flops_per_token(n, cfg.n_layer, seq_len, d_attn(cfg), attention=False))


def flops_per_token(n_params: int, n_layer: int, seq_len: int, d_attn: int, attention: bool = True) -> float:
    """Training FLOPs per token: 6·N, plus 12·L·T·d_attn for attention (PaLM app. B)."""
    return 6.0 * n_params + (12.0 * n_layer * seq_len * d_attn if attention else 0.0)


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return tokens_per_s * flops_per_tok / peak_flops


def one_step_without_sync(trainer) -> str:
    """One `train_step` with CUDA's sync debug mode at "error": "passed", or "failed: why"
    (the first operation that made the host wait for the device)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step()
        result = "passed"
    except RuntimeError as e:
        result = "failed: " + " ".join(str(e).split())[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return result


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="preset (default gpt2 on CUDA, gpt-mini on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 16 on CUDA, 2 on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024 on CUDA, 64 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 40 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on CUDA, 1 on CPU)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile (auto: on for CUDA)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "fp16"))
    ap.add_argument("--cpu", action="store_true", help="run the CPU fallback even where CUDA is available")
    ap.add_argument("--parallel", default="none",
                    help="comma-separated: none, ddp, fsdp (world size 1 through a process group: NCCL on CUDA, "
                         "gloo on the CPU; docs/distributed.md), each measured in turn")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    modes = [m.strip() for m in a.parallel.split(",") if m.strip()]
    results = [measure(a, m) for m in modes]
    if a.json:
        from pretune.fileio import atomic_write_json
        atomic_write_json(a.json, results[0] if len(results) == 1 else {"runs": results})
    return results[0] if len(results) == 1 else {"runs": results}


def measure(a, parallel: str = "none") -> dict:
    import torch

    from pretune.config.presets import preset
    from pretune.models.transformer import Transformer
    from pretune.objectives.losses import l1_loss
    from pretune_bench.harness import _Repeat
    from pretune.training.config import TrainConfig
    from pretune.training.loop import Trainer

    cuda = torch.cuda.is_available() and not a.cpu
    model_name = a.model or ("gpt2" if cuda else "gpt-mini")
    B = a.batch or (16 if cuda else 2)
    T = a.seq or (1024 if cuda else 64)
    steps = a.steps or (40 if cuda else 3)
    warmup = a.warmup if a.warmup is not None else (10 if cuda else 1)
    do_compile = a.compile == "on" or (a.compile == "auto" and cuda)
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    cfg = preset(model_name, dropout=0.0, max_seq_len=max(T, 8))
    torch.manual_seed(0)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (B, T + 1), generator=g)
    batch = {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
    tc = TrainConfig(steps=1 << 30, batch_size=B, warmup=0, device=device, precision=a.precision,
                     compile=do_compile, lr=6e-4, parallel=parallel)
    from pretune.training import distributed
    distributed.setup(tc)  # ddp / fsdp: a process group of one (NCCL on CUDA, gloo on the CPU)
    trainer = Trainer(model, tc, _Repeat(batch),
                      lambda m, b: (l1_loss(m, b["input_ids"], b["targets"]), {}), "/tmp", progress=False)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.train_step()
    sync()
    dt = time.perf_counter() - t0
    tok_s = B * T * steps / dt
    sync_check = one_step_without_sync(trainer) if cuda else None

    n, fpt, fpt_6n = flop_counts(cfg, T)
    if cuda:
        name = torch.cuda.get_device_name()
        peak, peak_src = dense_bf16_peak(name), "datasheet dense bf16"
        if a.precision == "fp32":
            peak, peak_src = None, "no fp32 peak listed"
    else:
        from pretune.hardware.peak import machine_key, measured_peak
        name = machine_key("cpu")
        dt_key = "bf16" if a.precision == "bf16" else "fp32"
        peak, peak_src = measured_peak(dt_key, "cpu", measure=True, seconds=1.0), f"measured {dt_key} matmul"
    out = {"device": name, "parallel": parallel, "model": model_name, "params_6n": n, "batch": B, "seq": T, "steps": steps,
           "warmup_steps": warmup, "warmup_s": warmup_s, "compile": do_compile, "precision": a.precision,
           "step_s": dt / steps, "tokens_per_s": tok_s, "loss": float(loss),
           "model_tflops": tok_s * fpt / 1e12, "peak_tflops": peak / 1e12 if peak else None, "peak_source": peak_src,
           "mfu": mfu(tok_s, fpt, peak) if peak else None, "mfu_6n": mfu(tok_s, fpt_6n, peak) if peak else None,
           "sync_check": sync_check, "torch": torch.__version__}
    if cuda:
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"{name} [{parallel}]: {model_name} B={B} T={T} {a.precision}{' compiled' if do_compile else ''}: "
          f"{dt / steps * 1e3:.1f} ms/step, {tok_s:,.0f} tokens/s, {out['model_tflops']:.1f} TFLOP/s"
          + (f", MFU {out['mfu']:.1%} (6N only: {out['mfu_6n']:.1%}) of {out['peak_tflops']:.4g} TFLOP/s "
             f"({peak_src})" if peak else ""))
    if sync_check is not None:
        print(f"host syncs in one training step (torch.cuda.set_sync_debug_mode('error')): "
              f"{'none' if sync_check == 'passed' else sync_check}")
    if cuda and out["mfu"] is not None:
        print(f"goal on an H100: MFU >= 45%: {'met' if out['mfu'] >= 0.45 else 'not met'}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
