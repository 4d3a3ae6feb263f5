"""Data-parallel scaling on the CPU: tokens/s of 2 processes x 1 thread (DDP, gloo) against 1
process x 1 thread, gpt-mini, the same micro-batch per process (weak scaling), and the share of
a 2-process step spent in the gradient all-reduce.

    python -m pretune_bench.scaling [--rounds 3] [--steps 8] [--batch 4] [--seq 128]

efficiency = tokens/s(2 processes) / (2 x tokens/s(1 process)); the target on a 2-core machine
is >= 85% (docs/distributed.md). The sides alternate for `rounds` rounds (1, 2, 2, 1, ...), as
harness.py does, and the medians are compared. The communication share is the time of one
all-reduce of every gradient (DDP's buckets, timed apart as one flat fp32 buffer of the same
size) over the median step time. Each worker is this module under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(a) -> None:
    """One process of a side: time `steps` train steps after 2 warm-up ones; rank 0 prints JSON."""
    import torch
    torch.set_num_threads(1)
    from pretune.config.presets import preset
    from pretune.models.transformer import Transformer
    from pretune.objectives.losses import l1_loss
    from pretune.training import distributed
    from pretune.training.config import TrainConfig
    from pretune.training.loop import Trainer
    from pretune_bench.harness import _Repeat

    world = distributed.env_world()
    tc = TrainConfig(steps=1 << 30, batch_size=a.batch, warmup=0, device="cpu", lr=6e-4, guard=False,
                     parallel="ddp" if world > 1 else "none")
    dp = distributed.setup(tc)
    cfg = preset("gpt-mini", dropout=0.0, max_seq_len=a.seq)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(dp.rank)
    x = torch.randint(cfg.vocab_size, (a.batch, a.seq + 1), generator=g)
    batch = {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
    t = Trainer(Transformer(cfg), tc, _Repeat(batch), lambda m, b: (l1_loss(m, b["input_ids"], b["targets"]), {}),
                "/tmp", progress=False)
    for _ in range(2):
        t.train_step()
    times = []
    for _ in range(a.steps):
        dp.barrier()
        t0 = time.perf_counter()
        t.train_step()
        times.append(time.perf_counter() - t0)
    comm = 0.0
    if world > 1:
        import torch.distributed as dist
        flat = torch.zeros(sum(p.numel() for p in t.model.parameters()))
        cs = []
        for _ in range(5):
            dp.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            cs.append(time.perf_counter() - t0)
        comm = statistics.median(cs)
    step = statistics.median(times)
    if dp.main:
        print("RESULT " + json.dumps({"world": world, "step_s": step, "tokens_per_s": world * a.batch * a.seq / step,
                                      "allreduce_s": comm}), flush=True)
    if world > 1:
        distributed.teardown()


def side(world: int, a) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "pretune_bench.scaling", "--worker", "--steps", str(a.steps), "--batch", str(a.batch),
            "--seq", str(a.seq)]
    if world > 1:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(port), *args]
    else:
        cmd = [sys.executable, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(out.stderr[-2000:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    res = {1: [], 2: []}
    load = os.getloadavg()[0]  # a quiet machine is what the figure needs: recorded with it
    for r in range(a.rounds):
        for w in ((1, 2) if r % 2 == 0 else (2, 1)):
            res[w].append(side(w, a))
    one = statistics.median(x["tokens_per_s"] for x in res[1])
    two = statistics.median(x["tokens_per_s"] for x in res[2])
    step2 = statistics.median(x["step_s"] for x in res[2])
    comm = statistics.median(x["allreduce_s"] for x in res[2])
    out = {"model": "gpt-mini", "batch_per_process": a.batch, "seq": a.seq, "rounds": a.rounds,
           "tokens_per_s_1x1": one, "tokens_per_s_2x1": two, "efficiency": two / (2 * one),
           "step_s_2x1": step2, "allreduce_s": comm, "communication_share": comm / step2, "target_efficiency": 0.85,
           "load_average_before": load, "load_average_after": os.getloadavg()[0]}
    print(f"gpt-mini B={a.batch} T={a.seq}: 1 x 1 thread {one:,.0f} tokens/s, 2 x 1 thread {two:,.0f} tokens/s: "
          f"scaling efficiency {out['efficiency']:.0%} (target >= 85%); all-reduce {comm * 1e3:.1f} ms of a "
          f"{step2 * 1e3:.0f} ms step ({out['communication_share']:.0%}); load average {load:.1f} before, "
          f"{out['load_average_after']:.1f} after")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
