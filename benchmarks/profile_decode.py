"""Where one greedy decoding step of gpt-mini spends its time (batch 1): the profile
behind docs/performance.md's account of the 3x generation target.

    python benchmarks/profile_decode.py --threads 1
    python benchmarks/profile_decode.py --threads 1 --compile   # adds a torch.compile'd step (~30 s)

Prints, per token: the model's matrix products alone (all of them cycled as
decoding cycles them, then the blocks' and the head's separately), the whole
eager step, and with --compile the compiled step and its compile time.
"""

from __future__ import annotations

import time

from _common import parser


def per_call(f, n: int, repeats: int = 5) -> float:
    """Median seconds per call of f over `repeats` timings of n calls, after a warm-up."""
    for _ in range(max(10, n // 10)):
        f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t) / n)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=5)
    ap.add_argument("--position", type=int, default=100, help="tokens already in the KV cache")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd decode step")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from pretune_bench import harness
    from pretune.inference.generate import gemv_layout
    from pretune.models.layers import KVCache
    from pretune.models.transformer import Transformer

    harness.set_threads(a.threads)
    cfg, _, _ = harness._config(harness.GPT_SHAPES["mini"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    cache = KVCache(cfg, 1, cfg.max_seq_len, "cpu", torch.float32)
    tok = torch.randint(cfg.vocab_size, (1, 1))
    rows: list[tuple[str, float, str]] = []
    with gemv_layout(model), torch.inference_mode():
        model(torch.randint(cfg.vocab_size, (1, a.position)), cache=cache)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = model.lm_head
        blocks = [m for m in linears if m is not head]
        x = {n: torch.randn(1, n) for n in {m.in_features for m in linears}}

        def products(ms):
            def f():
                for m in ms:
                    F.linear(x[m.in_features], m.weight, m.bias)
            return f

        def mb(ms):
            return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in ms) * 4 / 1e6

        for label, ms in [("all matrix products, cycled", linears), ("  the blocks' only", blocks),
                          ("  the head's only", [head])]:
            s = per_call(products(ms), 200, a.rounds)
            rows.append((label, s, f"{mb(ms):.1f} MB at {mb(ms) / s / 1e3:.1f} GB/s"))

        def step(model_fn):
            def f():
                cache.pos = a.position
                return model.logits(model_fn(tok, cache=cache)[:, -1]).argmax(-1)
            return f

        rows.append(("whole step, eager (blocks, head, argmax)", per_call(step(model), 200, a.rounds), ""))
        if a.compile:
            compiled = torch.compile(model, dynamic=True)
            t = time.perf_counter()
            step(compiled)()
            cache.pos = a.position + 1
            step(compiled)()  # a second position: the dynamic-shape graph
            rows.append(("whole step, torch.compile(dynamic=True)", per_call(step(compiled), 200, a.rounds),
                         f"compiled in {time.perf_counter() - t:.0f} s"))
    print(f"gpt-mini decode step at position {a.position}, batch 1, {torch.get_num_threads()} thread(s), per token:")
    for label, s, note in rows:
        print(f"  {label:<44} {s * 1e3:7.3f} ms   {note}")
