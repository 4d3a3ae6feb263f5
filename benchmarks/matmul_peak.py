"""The matmul peak in fp32 and bf16: one 2,048^3 matmul, best of 5 (the denominators of the
training steps' fraction of peak; bf16 is fast only on a CPU with AVX512-BF16 or AMX).

    python benchmarks/matmul_peak.py --threads 2
"""

import time

from _common import parser

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=5)
    ap.add_argument("--n", type=int, default=2048)
    a = ap.parse_args()
    import torch

    from pretune_bench.harness import cpu_has_native_bf16, set_threads

    set_threads(a.threads)
    n = a.n
    for dt in (torch.float32, torch.bfloat16):
        x, y = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        for _ in range(2):
            x @ y
        best = 0.0
        for _ in range(a.rounds):
            t = time.perf_counter()
            x @ y
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
        print(f"{str(dt):15} {best / 1e9:6.0f} GFLOP/s  ({torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()})")
