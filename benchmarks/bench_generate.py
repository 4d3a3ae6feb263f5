"""Greedy generation with a KV cache, pretune vs GPT2LMHeadModel.generate(use_cache=True).

    python benchmarks/bench_generate.py --shape mini --batch 1,8
    python benchmarks/bench_generate.py --shape gpt2 --batch 1 --rounds 2
    python benchmarks/bench_generate.py --shape gpt2 --batch 1 --weights int8,bf16,int4 --rounds 2
"""

from _common import parser, report

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=3)
    ap.add_argument("--shape", default="mini", help="mini or gpt2")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--weights", default="fp32", help="pretune's weights, comma-separated: fp32,bf16,int8,int4")
    a = ap.parse_args()
    from pretune_bench import cases

    report([cases.generation(a.shape, int(b), a.new_tokens, a.prompt, rounds=a.rounds, warmup=a.warmup,
                             threads=a.threads, progress=True, weights=w)
            for w in a.weights.split(",") for b in a.batch.split(",")], a.json)
