"""The spike / non-finite guard: transient faults injected into a tiny run (a poisoned batch, a
garbage batch, a batch whose gradients are NaN, the lr multiplied by 1000 for a few steps); the
run rolls back, skips the data, recovers, and ends where docs/robustness.md's table says, close
to the clean run: within about a sixth of the clean run's margin above the best possible loss. Plus
fp16 loss scaling."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from pretune import Transformer
from pretune.config.model import ModelConfig
from pretune.errors import PretuneError
from pretune.objectives.registry import pretrain_loss
from pretune.training.config import TrainConfig
from pretune.training.hooks import Hook, LossGuard
from pretune.training.loop import Trainer

V, T, B = 40, 16, 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def markov(g, n):
    """A learnable source: the next token is (3x + 1) mod V with probability 1/2, else uniform.
    The best possible loss is the entropy of that mixture, about 2.48 nats (ln 40 = 3.69)."""
    x = torch.empty(n, T + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(T):
        follow = torch.rand(n, generator=g) < 0.5
        x[:, t + 1] = torch.where(follow, (3 * x[:, t] + 1) % V, torch.randint(0, V, (n,), generator=g))
    return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


class Markov:
    """Batch k is a pure function of k; `poison` maps batch indices to a kind of fault."""

    def __init__(self, poison=None):
        self.k, self.poison, self.served = 0, dict(poison or {}), []

    def __iter__(self):
        return self

    def __next__(self):
        batch = markov(torch.Generator().manual_seed(1000 + self.k), B)
        kind = self.poison.get(self.k)
        if kind == "garbage":  # a batch of another distribution: a constant target the model never saw
            batch["targets"] = torch.full_like(batch["targets"], 7)
        elif kind in ("nan", "gradnan"):
            batch[kind] = True
        self.served.append(self.k)
        self.k += 1
        return batch

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


def loss_fn(model, batch):
    """pretrain_loss; a batch marked "nan" yields a NaN loss, as an overflow in the forward would;
    one marked "gradnan" a finite loss whose gradients are NaN (an overflow in the backward):
    sqrt(0 * w) is 0 forward, and its backward multiplies 1 / (2 sqrt(0)) = inf by 0."""
    nan = batch.pop("nan", False)
    gradnan = batch.pop("gradnan", False)
    loss, parts = pretrain_loss(model, batch)
    if gradnan:
        loss = loss + torch.sqrt(0.0 * model.wte.weight.sum())
    return (loss * float("nan") if nan else loss), parts


VAL = markov(torch.Generator().manual_seed(7), 64)


def run(tmp, hooks=(), poison=None, guard=True, steps=120, precision="fp32", **guard_kw):
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", vocab_size=V, max_seq_len=T, n_layer=1, n_head=2, d_model=32)
    model = Transformer(cfg)
    tc = TrainConfig(steps=steps, batch_size=B, lr=1e-2, warmup=5, log_every=5, eval_every=0, ckpt_every=10,
                     keep_last=2, seed=1, grad_clip=1.0, guard=False, device="cpu", precision=precision)
    gk = dict(factor=3.0, window=20, lr_scale=0.2, cooldown=5, max_interventions=3, verbose=False)
    gk.update(guard_kw)
    guard_hook = [LossGuard(**gk)] if guard else []

    def val():
        return {"val_loss": pretrain_loss(model, VAL)[0].item()}

    t = Trainer(model, tc, Markov(poison), loss_fn, tmp, eval_fn=val, hooks=[*guard_hook, *hooks], progress=False)
    final = t.fit()
    events = [r for r in map(json.loads, (tmp / "metrics.jsonl").read_text().splitlines()) if r.get("event")]
    return t, final, events


# The best possible loss: the next token is the follower (3x + 1) mod V with probability
# 1/2 + 1/2 * 1/40, each of the 39 others with 1/2 * 1/40; its entropy is 2.479 nats.
P_FOLLOW, P_OTHER = 0.5 + 0.5 / V, 0.5 / V
FLOOR = -(P_FOLLOW * math.log(P_FOLLOW) + (V - 1) * P_OTHER * math.log(P_OTHER))


def _doc_figures() -> dict:
    """docs/robustness.md, section 4: the clean run's validation loss and the table's final ones."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "robustness.md").read_text()
    section = text[text.index("## 4. The loss-spike"):text.index("## 5.")]
    figures = {"clean": float(re.search(r"reaches\s+val loss (\d\.\d+)", section).group(1))}
    for row in re.findall(r"^\| (.+?) \| (.+?) \| ([\d.]+) \| .+? \|$", section, re.M):
        figures[row[0]] = float(row[2])
    return figures


DOC = _doc_figures()
# Runs reproduce the doc's figures to 0.01 nats, and a recovered run ends within 0.02 of the clean
# one: about a sixth of the clean run's margin above the floor (0.118), where a 5% band (0.13) was all of it.
FIGURE_TOL, RECOVERED = 0.01, 0.02


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    t, final, events = run(tmp_path_factory.mktemp("clean"))
    assert events == []  # no false alarm on a healthy run
    assert abs(FLOOR - 2.479) < 1e-3
    assert FLOOR < final["val_loss"] < math.log(V)  # it learned (uniform is ln 40 = 3.69)
    assert abs(final["val_loss"] - DOC["clean"]) < FIGURE_TOL, (final["val_loss"], DOC["clean"])
    assert final["val_loss"] - FLOOR > 5 * RECOVERED  # the recovery band is a small part of the margin
    return final["val_loss"]


def recovered(final, clean, row):
    """The fault run ends at the doc table's figure, and near the clean run."""
    assert abs(final["val_loss"] - DOC[row]) < FIGURE_TOL, (final["val_loss"], DOC[row])
    assert final["val_loss"] - clean < RECOVERED, (final["val_loss"], clean)


class LrBurst(Hook):
    """The lr multiplied by `factor` for the first `n` optimizer steps at or after `start`
    (a transient fault: once done, it does not come back after the rollback)."""

    def __init__(self, start, n, factor):
        self.start, self.left, self.factor = start, n, factor

    def before_step(self, trainer):
        hit = trainer.step >= self.start and self.left > 0
        self.left -= hit
        for g in trainer.optimizer.param_groups:
            g["lr_scale"] = self.factor if hit else 1.0


def test_non_finite_loss_from_a_poisoned_batch(tmp_path, clean):
    t, final, events = run(tmp_path, poison={43: "nan"})
    assert len(events) == 1
    e = events[0]
    assert e["reason"].startswith("non-finite loss") and e["at_step"] == 44 and e["to_checkpoint"] == "step-000040"
    assert e["skipped_batches"] == [40, 44] and e["step"] == 40
    assert 43 not in t.batches.served[t.batches.served.index(43) + 1:]  # never read again
    assert all(math.isfinite(p.detach().abs().max().item()) for p in t.model.parameters())
    assert t.step == 120 and math.isfinite(final["val_loss"])
    recovered(final, clean, "batch 43 yields a NaN loss")


def test_non_finite_gradient_norm_with_a_finite_loss(tmp_path, clean):
    t, final, events = run(tmp_path, poison={43: "gradnan"})
    assert [(e["at_step"], e["to_checkpoint"], e["skipped_batches"]) for e in events] == [(44, "step-000040", [40, 44])]
    assert events[0]["reason"] == "non-finite gradient norm (nan)" and events[0]["spike_loss"] is not None
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    recovered(final, clean, "batch 43's gradients are NaN (its loss finite)")


def test_in_fp16_a_non_finite_gradient_is_the_loss_scalers(tmp_path):
    """In fp16 inf/NaN gradients are what dynamic loss scaling expects now and then: GradScaler
    skips the step and halves the scale, and the guard does not roll back."""
    t, final, events = run(tmp_path, poison={43: "gradnan"}, precision="fp16")
    assert events == [] and t.step == 120
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    at = {r["step"]: r for r in rows}
    assert at[45]["skipped_steps"] == at[40].get("skipped_steps", 0) + 1  # step 44 was skipped ...
    assert at[45]["loss_scale"] == at[40]["loss_scale"] / 2  # ... and the scale halved
    assert all(torch.isfinite(p).all() for p in t.model.parameters()) and math.isfinite(final["val_loss"])


def test_loss_spike_from_a_garbage_batch(tmp_path, clean):
    # every token of batch 63 becomes 7: about ln(80) = 4.4 nats where the model is at ~2.7;
    # that is 1.6x the median, caught with the factor at 1.5 (normal batches vary by a few %)
    t, final, events = run(tmp_path, poison={63: "garbage"}, factor=1.5)
    assert [e["at_step"] for e in events] == [64]
    assert events[0]["reason"].startswith("loss spike") and events[0]["spike_loss"] > 1.5 * events[0]["median"]
    recovered(final, clean, "batch 63 replaced by garbage (every target 7), factor 1.5")


def test_lr_times_1000_for_three_steps(tmp_path, clean):
    # Unguarded, the same fault ruins the run (the check that the fault is a real one) ...
    _, hurt, _ = run(tmp_path / "unguarded", hooks=[LrBurst(50, 3, 1000.0)], guard=False)
    assert not math.isfinite(hurt["val_loss"]) or hurt["val_loss"] > math.log(V), hurt  # worse than uniform
    # ... guarded, it rolls back (once per burst step that comes after a rollback) and recovers:
    # step 52 spikes, back to step 50; the burst's last step replays and spikes once more.
    t, final, events = run(tmp_path / "guarded", hooks=[LrBurst(50, 3, 1000.0)])
    assert [(e["at_step"], e["to_checkpoint"]) for e in events] == [(52, "step-000050")] * 2
    rows = [json.loads(l) for l in (tmp_path / "guarded" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("guard_lr_scale") == pytest.approx(0.2) for r in rows)  # the cooldown is logged
    recovered(final, clean, "lr × 1000 for three steps from step 50")


def test_the_lr_cooldown_then_ramp():
    g = LossGuard(lr_scale=0.1, cooldown=10)
    g.since = 100
    assert [g.scale_at(s) for s in (100, 109)] == [0.1, 0.1]
    assert g.scale_at(115) == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert g.scale_at(120) == 1.0


def test_stops_with_one_line_after_max_interventions(tmp_path):
    poison = {k: "nan" for k in range(30, 200)}  # every batch from 30 on is bad: no recovery possible
    with pytest.raises(PretuneError) as e:
        run(tmp_path, poison=poison, max_interventions=2)
    msg = str(e.value)
    assert "after 2 rollbacks" in msg and "non-finite loss" in msg and "\n" not in msg
    events = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r.get("event")]
    assert len(events) == 2
    from pretune.runs.checkpoint import latest_checkpoint
    from safetensors.torch import load_file
    w = load_file(str(latest_checkpoint(tmp_path) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())  # the last good checkpoint is left good


def test_rollback_is_resumable_exactly(tmp_path):
    """A run with an intervention, stopped after it and resumed, equals one that was not stopped."""
    class StopAt(Hook):
        def after_step(self, trainer, loss, parts):
            if trainer.step == 55:
                trainer.stop_requested = True

    a, _, ea = run(tmp_path / "a", poison={43: "nan"}, steps=70)
    run(tmp_path / "b", poison={43: "nan"}, steps=70, hooks=[StopAt()])
    b, _, eb = run(tmp_path / "b", poison={43: "nan"}, steps=70)
    assert len(ea) == len(eb) == 1
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


# ---- fp16: dynamic loss scaling -----------------------------------------------------------

def tiny_loss(model, batch):
    """L1 scaled by 1e-6: the gradients (~1e-9 and below) underflow to zero in fp16 (smallest
    subnormal 6e-8) unless the loss is scaled up first, as Micikevicius et al. 2018 describe."""
    loss, parts = pretrain_loss(model, batch)
    return loss * 1e-6, parts


def fp16_run(tmp, scaler=True, steps=30, hooks=(), loss=tiny_loss):
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", vocab_size=V, max_seq_len=T, n_layer=1, n_head=2, d_model=32, dropout=0.0)
    tc = TrainConfig(steps=steps, batch_size=B, lr=3e-3, warmup=0, decay="constant", log_every=1, eval_every=0,
                     ckpt_every=10, precision="fp16", weight_decay=0.0, grad_clip=0.0, seed=1, device="cpu",
                     guard=False)
    t = Trainer(Transformer(cfg), tc, Markov(), loss, tmp, hooks=list(hooks), progress=False)
    if not scaler:
        t.scaler = torch.amp.GradScaler("cpu", enabled=False)
    w0 = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.fit()
    moved = sum(not torch.equal(w0[n], p) for n, p in t.model.named_parameters())
    rows = [json.loads(l) for l in (tmp / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    return t, moved, rows


def test_fp16_gradients_underflow_without_scaling_and_train_with_it(tmp_path):
    _, moved, rows = fp16_run(tmp_path / "unscaled", scaler=False)
    # Without scaling the matrices behind fp16 matmuls get exactly zero gradient and never move
    # (only parameters whose gradients are computed in fp32 by autocast, e.g. norms, may move).
    n_params = len(list(Transformer(ModelConfig(name="t", vocab_size=V, max_seq_len=T, n_layer=1, n_head=2,
                                                d_model=32)).parameters()))
    assert moved == 0
    t, moved_s, rows_s = fp16_run(tmp_path / "scaled", steps=80)
    assert moved_s == n_params
    first, last = rows_s[0]["loss"] * 1e6, sum(r["loss"] for r in rows_s[-5:]) / 5 * 1e6
    assert last < first - 0.5, (first, last)  # it learns
    assert rows_s[-1]["loss_scale"] >= 2.0 ** 16


def test_fp16_skipped_steps_are_counted_and_the_scale_is_resumed(tmp_path):
    def overflow_first(model, batch):  # a loss so large that its scaled gradients overflow fp16
        loss, parts = pretrain_loss(model, batch)
        return loss * (1e6 if overflow_first.n < 2 else 1.0), parts
    overflow_first.n = 0

    class Count(Hook):
        def after_step(self, trainer, loss, parts):
            overflow_first.n += 1

    class StopAt(Hook):
        def after_step(self, trainer, loss, parts):
            if trainer.step == 20:
                trainer.stop_requested = True

    t, _, rows = fp16_run(tmp_path / "a", loss=overflow_first, hooks=[Count(), StopAt()], steps=30)
    assert t.step == 20 and t.skipped_steps == 2 and rows[-1]["skipped_steps"] == 2
    assert [r["loss_scale"] for r in rows[:3]] == [2.0 ** 15, 2.0 ** 14, 2.0 ** 14]  # halved at each overflow
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-000020" / "state.json").read_text())
    assert state["scaler"]["scale"] == 2.0 ** 14 and state["skipped_steps"] == 2
    # resumed with 10 steps left, it ends bit-identical to a run of 30 that was never stopped
    t2, _, rows2 = fp16_run(tmp_path / "a", loss=overflow_first, hooks=[Count()], steps=30)
    assert t2.step == 30 and rows2[-1]["step"] == 30
    overflow_first.n = 0
    t3, _, rows3 = fp16_run(tmp_path / "b", loss=overflow_first, hooks=[Count()], steps=30)
    for (n, p), (_, q) in zip(t3.model.named_parameters(), t2.model.named_parameters()):
        assert torch.equal(p, q), n
    assert t2.scaler.state_dict() == t3.scaler.state_dict() and t2.skipped_steps == t3.skipped_steps == 2
    assert [r["loss"] for r in rows2] == [r["loss"] for r in rows3]
