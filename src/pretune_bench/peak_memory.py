"""Peak memory of one training step with and without --train.activation-checkpointing: the peak
RSS (getrusage ru_maxrss) of a fresh process that builds the GPT-2 small shape, runs one step of
batch x seq tokens (fp32, CPU), and exits; and the loss of that step, which must be the same.

    python -m pretune_bench.peak_memory [--batch 4] [--seq 1024] [--model gpt2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def worker(a) -> None:
    import resource

    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from pretune.config.presets import preset
    from pretune.models.transformer import Transformer
    from pretune.objectives.losses import l1_loss
    from pretune.training.config import TrainConfig
    from pretune.training.loop import Trainer
    from pretune_bench.harness import _Repeat

    cfg = preset(a.model, dropout=0.0, max_seq_len=a.seq)
    torch.manual_seed(0)
    x = torch.randint(cfg.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
    tc = TrainConfig(steps=10, batch_size=a.batch, warmup=0, device="cpu", guard=False,
                     activation_checkpointing=a.ckpt)
    t = Trainer(Transformer(cfg), tc, _Repeat(batch), lambda m, b: (l1_loss(m, b["input_ids"], b["targets"]), {}),
                "/tmp", progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, _ = t.train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps({"checkpointing": a.ckpt, "peak_rss_gb": peak / 1e6, "before_step_gb": before / 1e6,
                                  "loss": float(loss)}), flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    res = {}
    for ckpt in (False, True):
        cmd = [sys.executable, "-m", "pretune_bench.peak_memory", "--worker", "--batch", str(a.batch), "--seq",
               str(a.seq), "--model", a.model] + (["--ckpt"] if ckpt else [])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(out.stderr[-2000:])
        res[ckpt] = json.loads(line[len("RESULT "):])
    out = {"model": a.model, "batch": a.batch, "seq": a.seq, "peak_rss_gb": res[False]["peak_rss_gb"],
           "peak_rss_gb_checkpointing": res[True]["peak_rss_gb"], "loss": res[False]["loss"],
           "loss_checkpointing": res[True]["loss"]}
    print(f"{a.model} B={a.batch} T={a.seq} fp32, one step: peak RSS {out['peak_rss_gb']:.2f} GB, with activation "
          f"checkpointing {out['peak_rss_gb_checkpointing']:.2f} GB; loss {out['loss']:.6f} / "
          f"{out['loss_checkpointing']:.6f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
