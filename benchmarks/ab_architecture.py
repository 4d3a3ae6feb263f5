"""The architecture change's cost in speed (issue 14, item 10): the code before the move (commit
37fc1da, one flat package) against this checkout, in one process, on the same weights and batch,
the sides alternating round by round. The old tree is taken from git into a temporary folder as a
second package, `pretune_old` (it uses relative imports only, so the rename is all it needs).

    python benchmarks/ab_architecture.py --threads 1 --rounds 21 --train-rounds 7

Each round builds a fresh instance of both models (in alternating order), loads the same weights
and times each side once, warmed up: on this machine two instances of the *same* code differ by
5-14% in decoding, by where their weights and caches happen to lie in memory, so one instance per
side measures placement as much as code. The figure is the median over rounds of the per-round
speed ratio, with its quartiles.
"""

import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from _common import parser

OLD = "37fc1da"


def old_package(root: Path) -> Path:
    """`git archive OLD src/pretune` unpacked as <tmp>/pretune_old."""
    tmp = Path(tempfile.mkdtemp(prefix="pretune-ab-"))
    blob = subprocess.run(["git", "-C", str(root), "archive", OLD, "src/pretune"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as t:
        t.extractall(tmp, filter="data")
    (tmp / "src" / "pretune").rename(tmp / "pretune_old")
    return tmp


def fresh_rounds(make, rounds, reps=1):
    """make[side]() -> a callable on a fresh instance; returns (median, q1, q3) of before/after time."""
    ratios, med = [], {k: [] for k in make}
    for r in range(rounds):
        sides = list(make) if r % 2 == 0 else list(make)[::-1]
        fns = {k: make[k]() for k in sides}  # built in this round's order
        t = {}
        for k in sides:
            fns[k]()  # warm-up
        for k in sides:
            s = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            t[k] = time.perf_counter() - s
            med[k].append(t[k])
        ratios.append(t["before"] / t["after"])
        del fns
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2], {k: statistics.median(v) for k, v in med.items()}


if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=21)
    ap.add_argument("--train-rounds", type=int, default=7)
    ap.add_argument("--cases", default="train,bert,b1,b8", help="which of train, bert, b1, b8 to run")
    a = ap.parse_args()
    sys.path.insert(0, str(old_package(Path(__file__).resolve().parents[1])))
    import torch
    from pretune_old.generate import generate as old_gen
    from pretune_old.model import Transformer as OldT
    from pretune_old.objectives import l1_loss as old_l1
    from pretune_old.objectives import mlm_mask
    from pretune_old.objectives import mlm_nsp_loss as old_mlm
    from pretune_old.speed import BERT_SHAPES, GPT_SHAPES
    from pretune_old.speed import _config as old_config
    from pretune_old.speed import _Repeat as OldRepeat
    from pretune_old.train import TrainConfig as OldTC
    from pretune_old.train import Trainer as OldTr

    from pretune.config.model import ModelConfig
    from pretune.inference.generate import generate as new_gen
    from pretune.models.transformer import Transformer as NewT
    from pretune.objectives.losses import l1_loss as new_l1
    from pretune.objectives.losses import mlm_nsp_loss as new_mlm
    from pretune.training.config import TrainConfig as NewTC
    from pretune.training.loop import Trainer as NewTr
    from pretune_bench.harness import _Repeat as NewRepeat

    torch.set_num_threads(a.threads or 1)

    def models(cfg, sd, side):
        m = OldT(cfg) if side == "before" else NewT(
            ModelConfig(**{k: v for k, v in cfg.__dict__.items() if k in ModelConfig.__dataclass_fields__}))
        m.load_state_dict(sd, strict=True)
        return m

    def trainer(side, cfg, sd, batch, loss):
        Tr, TC, Rep = (OldTr, OldTC, OldRepeat) if side == "before" else (NewTr, NewTC, NewRepeat)
        tc = TC(steps=1 << 30, batch_size=batch["input_ids"].shape[0], warmup=0, device="cpu", precision="fp32", grad_clip=1.0)
        return Tr(models(cfg, sd, side), tc, Rep(batch), loss[side], tempfile.gettempdir(), progress=False).train_step

    out = {}
    torch.manual_seed(0)
    cfg, B, T = old_config(GPT_SHAPES["mini"])
    sd = OldT(cfg).state_dict()
    x = torch.randint(cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    b = {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
    loss = {"before": lambda m, bb: (old_l1(m, bb["input_ids"], bb["targets"]), {}),
            "after": lambda m, bb: (new_l1(m, bb["input_ids"], bb["targets"]), {})}
    cases = a.cases.split(",")
    if "train" in cases:
        out["GPT train step, gpt-mini fp32"] = fresh_rounds(
            {k: (lambda k=k: trainer(k, cfg, sd, b, loss)) for k in ("before", "after")}, a.train_rounds, 2)

    cfg, B, T = old_config(BERT_SHAPES["mini"], nsp_head=False)
    sd = OldT(cfg).state_dict()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(min(1000, cfg.vocab_size // 2), cfg.vocab_size, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    masked, labels = mlm_mask(ids, (ids == 101) | (ids == 102), 103, cfg.vocab_size, g)
    seg = torch.zeros_like(ids)
    seg[:, T // 2:] = 1
    bb = {"input_ids": masked, "segment_ids": seg, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels}
    if "bert" in cases:
        out["BERT MLM step, bert-mini"] = fresh_rounds(
            {k: (lambda k=k: trainer(k, cfg, sd, bb, {"before": old_mlm, "after": new_mlm})) for k in ("before", "after")},
            a.train_rounds, 2)

    cfg, _, _ = old_config(GPT_SHAPES["mini"])
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, 16 + 128))
    sd = OldT(cfg).state_dict()
    gen = {"before": old_gen, "after": new_gen}
    for batch in [b for b in (1, 8) if f"b{b}" in cases]:
        p = torch.randint(cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(1))
        o, n = models(cfg, sd, "before").eval(), models(cfg, sd, "after").eval()
        assert torch.equal(old_gen(o, p, 128, temperature=0.0), new_gen(n, p, 128, temperature=0.0)), "different tokens"
        del o, n

        def decode(side, p=p):
            m = models(cfg, sd, side).eval()
            return lambda: gen[side](m, p, 128, temperature=0.0)
        out[f"generate gpt-mini b{batch}, 128 tokens"] = fresh_rounds(
            {k: (lambda k=k: decode(k)) for k in ("before", "after")}, a.rounds)
    print(f"{a.threads or 1} thread(s); speed after/before, median over fresh-instance rounds [quartiles]")
    for k, (m, q1, q3, t) in out.items():
        print(f"{k:34s} before {t['before'] * 1e3:8.1f} ms  after {t['after'] * 1e3:8.1f} ms  "
              f"speed {m:.3f} [{q1:.3f}, {q3:.3f}]")
