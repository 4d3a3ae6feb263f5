"""The routed MoE layer's speed beside a dense MLP of the same active parameters.

Both layers see the same tokens; each round times forward + backward of one
layer, the two alternating (A, B, A, B, ...) after warm-up so drift in the
machine's speed falls on both alike. Prints one JSON object: the medians in
tokens/s and the ratio MoE / dense (1 = routing costs nothing).

    .venv/bin/python benchmarks/bench_moe.py                      # E=8, top-2, expert ff = dense ff / 2
    .venv/bin/python benchmarks/bench_moe.py --capacity-factor 1.25 --mlp swiglu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pretune.config.model import ModelConfig
from pretune.models.counting import count_params
from pretune.models.layers import MLP
from pretune.models.moe import MoE


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024, help="the dense layer's hidden width")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--mlp", default="gelu_tanh", choices=["gelu", "gelu_tanh", "swiglu"])
    ap.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x sequence)")
    ap.add_argument("--iters", type=int, default=5, help="forward+backward passes per timed round")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds of each layer")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    # Same active parameters per token: k experts of d_ff / k each against one MLP of d_ff.
    d_expert = a.d_ff // a.top_k
    base = dict(vocab_size=64, max_seq_len=16, n_layer=1, n_head=1, d_model=a.d_model, d_ff=a.d_ff,
                mlp=a.mlp, dropout=0.0)
    dense = MLP(ModelConfig(**base))
    mc = ModelConfig(**base, n_expert=a.experts, top_k=a.top_k, d_expert_ff=d_expert,
                     capacity_factor=a.capacity_factor)
    moe = MoE(mc)
    x = torch.randn(1, a.tokens, a.d_model)

    def step_dense():
        x.grad = None
        dense(x).sum().backward()

    def step_moe():
        x.grad = None
        (moe(x).sum() + moe.aux_loss).backward()

    xr = x.requires_grad_()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(a.iters):
            fn()
        return a.tokens * a.iters / (time.perf_counter() - t0)

    for _ in range(a.warmup):
        timed(step_dense)
        timed(step_moe)
    td, tm = [], []
    for _ in range(a.rounds):  # A/B alternation
        td.append(timed(step_dense))
        tm.append(timed(step_moe))
    d_med, m_med = statistics.median(td), statistics.median(tm)
    active = count_params(mc)["active"] - count_params(ModelConfig(**base))["total"]
    out = {
        "layer": f"E={a.experts} top-{a.top_k}, expert ff {d_expert} vs dense ff {a.d_ff}, d={a.d_model}, {a.mlp}",
        "capacity_factor": a.capacity_factor,
        "tokens_per_step": a.tokens,
        "dense_tok_per_s": round(d_med),
        "moe_tok_per_s": round(m_med),
        "ratio_moe_over_dense": round(m_med / d_med, 3),
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "moe_params_total": sum(p.numel() for p in moe.parameters()),
        "moe_extra_active_params": active,  # the router (d * E) and the k-1 extra output biases
        "rounds": a.rounds, "iters_per_round": a.iters,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "dropped_fraction": round(float(moe.stats["dropped"]), 4),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
