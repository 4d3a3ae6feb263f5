"""BERT MLM training step, pretune (MLM head on the masked rows) vs transformers' BertForMaskedLM.

    python benchmarks/bench_bert.py --rounds 7
"""

from _common import parser, report

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=7)
    ap.add_argument("--precision", default="fp32", help="fp32 or bf16")
    a = ap.parse_args()
    from pretune_bench import cases

    report([cases.bert_mlm("mini", rounds=a.rounds, warmup=a.warmup, threads=a.threads, precision=a.precision,
                           progress=True)], a.json)
