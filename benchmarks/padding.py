"""What bucketing by length saves in fine-tuning: tokens computed (padding included)
per real token, for each built-in task, with and without `ClassificationBatches`'
length buckets.

    python benchmarks/padding.py --batch 32 --tokenizer gpt2
"""

from _common import parser

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bucket", type=int, default=8, help="batches per length-sorted chunk (1 = no bucketing)")
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--max-len", type=int, default=256)
    a = ap.parse_args()
    from pretune.data.labelled import BUILTIN, load_task
    from pretune.data.encoding import ClassificationBatches, TextEncoder
    from pretune.data.tokenizers import load_tokenizer

    tok = load_tokenizer(a.tokenizer)
    print(f"tokens computed per real token, one epoch of the train split, batch {a.batch}, {a.tokenizer}:")
    for name in BUILTIN:
        enc = TextEncoder(tok, True, a.max_len).encode(load_task(name).split("train"), warn=False)
        row = []
        for bucket in (1, a.bucket):
            batches = ClassificationBatches(enc, a.batch, 0, tok.eos_id or 0, bucket=bucket)
            real = total = 0
            for _ in range(batches.per_epoch):
                m = next(batches)["attention_mask"]
                real, total = real + int(m.sum()), total + m.numel()
            row.append(total / real)
        print(f"  {name:<16} no buckets {row[0]:.2f}   buckets of {a.bucket} batches {row[1]:.2f}   "
              f"({row[0] / row[1]:.2f}x fewer)")
