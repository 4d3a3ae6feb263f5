"""Data: tokenization MB/s (vs transformers' fast tokenizer) and loader tokens/s (vs nanoGPT's get_batch).

    python benchmarks/bench_data.py
"""

from _common import parser, report

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=3)
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--megabytes", type=float, default=2.0, help="text to tokenize per round")
    a = ap.parse_args()
    from pretune_bench import cases

    kw = dict(rounds=a.rounds, warmup=a.warmup, threads=a.threads, progress=True)
    report([cases.tokenization(a.tokenizer, int(a.megabytes * 1e6), **kw), cases.loader(**kw)], a.json)
