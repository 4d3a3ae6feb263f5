"""A/B of the fused loss's softmax (second round of issue 19): the current
objectives/linear_cross_entropy.py against an older copy of it (OLD, a file path), gpt-mini,
with transformers beside them, alternating in one process.

    git show 3aa8276:src/pretune/objectives/linear_cross_entropy.py > /tmp/lce_old.py
    python benchmarks/bf16_lce_ab.py 1 5 bf16 /tmp/lce_old.py     # threads, rounds, precision, OLD
    python benchmarks/bf16_lce_ab.py 1 2 bf16 /tmp/lce_old.py gpt2   # the GPT-2-small shape (third round:
    # OLD from `git show 856ae34:src/pretune/objectives/linear_cross_entropy.py`)
"""
import sys, torch, statistics, importlib.util
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
torch.set_num_threads(int(sys.argv[1])); P = sys.argv[3] if len(sys.argv) > 3 else "bf16"
from pretune_bench import harness, cases
from pretune.models.transformer import Transformer
import pretune.objectives.losses as L
from pretune.objectives.losses import l1_loss
spec = importlib.util.spec_from_file_location("lce_old", sys.argv[4] if len(sys.argv) > 4 else "/tmp/lce_old.py"); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
new_fn = L.linear_cross_entropy
cfg,B,T = harness._config(harness.GPT_SHAPES[sys.argv[5] if len(sys.argv) > 5 else "mini"])
torch.manual_seed(0)
m1 = Transformer(cfg); m2 = Transformer(cfg); m2.load_state_dict(m1.state_dict())
hf = cases.hf_gpt2(m1).train()
x = torch.randint(cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
batch = {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
def lf(fn):
    def f(m, b):
        L.linear_cross_entropy = fn
        return l1_loss(m, b["input_ids"], b["targets"]), {}
    return f
t1 = harness._trainer(m1, batch, lf(new_fn), P); t2 = harness._trainer(m2, batch, lf(old.linear_cross_entropy), P)
opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
fns = {"new": t1.train_step, "old": t2.train_step, "hf": harness._hf_step(hf, opt, P, input_ids=batch["input_ids"], labels=batch["input_ids"])}
t = harness.alternate(fns, int(sys.argv[2]), 1)
med = {k: statistics.median(v["wall"]) for k, v in t.items()}
for k, v in med.items(): print(f"{k:8} {B*T/v:7.0f} tok/s  vs hf {med['hf']/v:.2f}x", [round(a,2) for a in t[k]["wall"]])
