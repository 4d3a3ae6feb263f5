"""GPT training step, pretune vs transformers' GPT2LMHeadModel (SDPA): tokens/s, GFLOP/s, ratio.

    python benchmarks/bench_train.py --shape mini --precision fp32,bf16
    python benchmarks/bench_train.py --shape gpt2 --rounds 3      # ~30 s a step on 2 cores
    python benchmarks/bench_train.py --compile                     # torch.compile vs eager, pretune only
"""

from _common import parser, report

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=5)
    ap.add_argument("--shape", default="mini", help="mini (4x256, vocab 8192, 16x256) or gpt2 (12x768, 4x256)")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16")
    ap.add_argument("--compile", action="store_true", help="time torch.compile against eager (pretune on both sides)")
    ap.add_argument("--peak", action="store_true", help="also time the fp32 matmul peak in every round")
    ap.add_argument("--bf16-gain", action="store_true", help="time pretune bf16 autocast against pretune fp32")
    a = ap.parse_args()
    from pretune_bench import cases

    out = []
    for prec in a.precision.split(","):
        common = dict(shape=a.shape, precision=prec, rounds=a.rounds, warmup=a.warmup, threads=a.threads,
                      progress=True)
        if a.bf16_gain:
            out.append(cases.variant_gain(a.shape, "bf16", a.rounds, a.warmup, a.threads, progress=True))
            break
        if a.compile:
            common.pop("precision")
            out.append(cases.variant_gain(variant="compile", **common))
        else:
            out.append(cases.gpt_train(peak=a.peak or a.shape == "gpt2", **common))
    report(out, a.json)
