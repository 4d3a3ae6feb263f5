import json
import math

import pytest
import torch

from pretune import Transformer
from pretune.config.model import ModelConfig
from pretune.objectives.linear_cross_entropy import IGNORE
from pretune.objectives.registry import pretrain_loss
from pretune.objectives.masking import mlm_mask
from pretune.runs.checkpoint import latest_checkpoint, list_checkpoints
from pretune.training.config import TrainConfig, lr_at, param_groups
from pretune.training.hooks import Hook
from pretune.training.loop import Trainer


class Synthetic:
    """Batch k is a pure function of (seed, k): the loader contract of data/loaders.py."""

    def __init__(self, causal, seed=0, B=4, T=16, V=50):
        self.causal, self.seed, self.B, self.T, self.V, self.k = causal, seed, B, T, V, 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.k)
        self.k += 1
        x = torch.randint(5, self.V, (self.B, self.T + 1), generator=g)
        if self.causal:
            return {"input_ids": x[:, :-1], "targets": x[:, 1:]}
        ids = x[:, :-1]
        ids[:, 0] = 1
        special = ids < 5
        inp, labels = mlm_mask(ids, special, 4, self.V, g)
        labels[:, 1] = ids[:, 1]  # at least one prediction per row
        return {"input_ids": inp, "segment_ids": torch.zeros_like(ids),
                "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels,
                "nsp_labels": torch.randint(0, 2, (self.B,), generator=g)}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


def cfg(causal):
    kw = dict(name="t", vocab_size=50, max_seq_len=16, n_layer=2, n_head=2, d_model=32, dropout=0.1)
    if not causal:
        kw.update(causal=False, type_vocab_size=2, nsp_head=True, norm_placement="post", embedding_norm=True)
    return ModelConfig(**kw)


@pytest.mark.parametrize("causal", [True, False], ids=["gpt-L1", "bert-MLM+NSP"])
def test_resume_is_bit_identical(tmp_path, causal):
    tc = dict(batch_size=4, lr=1e-2, warmup=3, log_every=5, eval_every=0, ckpt_every=100, seed=3)

    class StopAt(Hook):  # an interruption after step 10 of the same 20-step command
        def after_step(self, trainer, loss, parts):
            if trainer.step == 10:
                trainer.stop_requested = True

    def trainer(d, hooks=()):
        torch.manual_seed(123)
        return Trainer(Transformer(cfg(causal)), TrainConfig(steps=20, **tc), Synthetic(causal),
                       pretrain_loss, d, progress=False, hooks=list(hooks))

    straight = trainer(tmp_path / "a")
    straight.fit()
    first = trainer(tmp_path / "b", [StopAt()])
    first.fit()
    assert first.step == 10
    torch.manual_seed(999)  # the resumed process starts from another RNG state: the checkpoint restores it
    second = trainer(tmp_path / "b")
    second.fit()
    assert second.step == 20
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n
    # the metrics of the two runs agree line by line
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_rerunning_a_finished_run_logs_its_final_evaluation_once(tmp_path):
    """Killed after the final checkpoint (the plot, the exit): the rerun finds step == steps and must
    not evaluate and log again (test_faults' SIGKILL at a random moment hit exactly this)."""
    def trainer():
        torch.manual_seed(0)
        return Trainer(Transformer(cfg(True)), TrainConfig(steps=10, batch_size=4, log_every=5, eval_every=5,
                                                           ckpt_every=5), Synthetic(True), pretrain_loss,
                       tmp_path, eval_fn=lambda: {"val_loss": 1.5}, progress=False)

    first = trainer().fit()
    rows = (tmp_path / "metrics.jsonl").read_text()
    again = trainer().fit()
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    assert [json.loads(l) for l in rows.splitlines()].count({"step": 10, "val_loss": 1.5}) == 1
    assert again["val_loss"] == first["val_loss"] == 1.5


# Scripted validations, by step (by hand): the accuracy rises while the loss rises too, as in
# MiniLM's epoch 2 (docs/finetuning.md, "Defaults that work"), then a tie on accuracy, then decline.
SCRIPT = {2: (0.30, 0.85), 4: (0.33, 0.89), 6: (0.31, 0.89), 8: (0.35, 0.88), 10: (0.36, 0.87),
          12: (0.29, 0.86), 14: (float("nan"), 0.95), 16: (0.40, 0.80)}


def _scripted(d, select, hooks=(), steps=16, patience=3):
    from pretune.training.hooks import EarlyStopping
    torch.manual_seed(0)
    box = {}

    def eval_fn():
        loss, acc = SCRIPT[box["t"].step]
        return {"val_loss": loss, "val_acc": acc}
    t = box["t"] = Trainer(Transformer(cfg(True)), TrainConfig(steps=steps, batch_size=4, log_every=100, eval_every=2,
                                                               ckpt_every=2, keep_last=1), Synthetic(True),
                           pretrain_loss, d, eval_fn=eval_fn, hooks=[EarlyStopping(patience), *hooks], progress=False,
                           select=select)
    return t


@pytest.mark.parametrize("select, best, stop", [("accuracy", 6, 12), ("loss", 2, 8)])
def test_the_best_step_and_early_stopping_follow_the_selection(tmp_path, select, best, stop):
    """By accuracy, then loss: step 4 beats 2 (0.89 > 0.85, though its loss is higher), 6 beats 4 (the
    same accuracy, a lower loss); 8, 10, 12 do not improve, so patience 3 stops at 12. By loss: 2 is
    the lowest until 12, so patience 3 stops at 8. The kept checkpoint survives keep_last=1."""
    from pretune.training.selection import BY_ACCURACY, BY_LOSS
    t = _scripted(tmp_path, {"accuracy": BY_ACCURACY, "loss": BY_LOSS}[select])
    t.fit()
    assert (t.best_step, t.step) == (best, stop)
    assert t.best_val == SCRIPT[best][0]
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} >= {f"step-{best:06d}"}


def test_a_resumed_run_keeps_the_best_it_had(tmp_path):
    """Stopped at step 8 and resumed: the best (6, by accuracy) is restored, so step 8's 0.88 does not
    replace it, and a non-finite loss (step 14's NaN, with the highest accuracy) never becomes the best."""
    from pretune.training.selection import BY_ACCURACY

    class StopAt(Hook):
        def after_step(self, trainer, loss, parts):
            if trainer.step == 8:
                trainer.stop_requested = True

    first = _scripted(tmp_path, BY_ACCURACY, [StopAt()])
    first.fit()
    assert first.best_step == 6
    second = _scripted(tmp_path, BY_ACCURACY, patience=None)  # no patience: it reaches 14 and 16
    second.fit()
    assert (second.best_step, second.step) == (6, 16)


def test_lr_schedule_by_hand():
    tc = TrainConfig(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1, decay="cosine")
    assert lr_at(0, tc) == pytest.approx(0.1)
    assert lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lr_at(110, tc) == pytest.approx(0.1)
    lin = TrainConfig(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.0, decay="linear")
    assert lr_at(35, lin) == pytest.approx(0.75)


def test_no_weight_decay_on_biases_norms_and_embeddings_when_asked():
    """The policy before recipes (tests/test_recipes.py checks each family's): embeddings kept too."""
    m = Transformer(cfg(True))
    decay, no_decay = param_groups(m, 0.1, "bias,norm,embedding")
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] for p in decay["params"])
    assert any("wte" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_checkpoints_pruned_and_loss_plot_written(tmp_path):
    t = Trainer(Transformer(cfg(True)), TrainConfig(steps=20, batch_size=4, ckpt_every=5, keep_last=2,
                                                   eval_every=0, log_every=5), Synthetic(True),
                pretrain_loss, tmp_path, progress=False)
    t.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000015", "step-000020"]
    assert latest_checkpoint(tmp_path).name == "step-000020"
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_training_lowers_the_loss_with_grad_accumulation(tmp_path):
    class Repeat(Synthetic):
        def __next__(self):
            self.k += 1
            x = torch.arange(17).repeat(4, 1) % 7 + 5
            return {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    t = Trainer(Transformer(cfg(True)), TrainConfig(steps=60, batch_size=4, grad_accum=2, lr=1e-2, warmup=5,
                                                   eval_every=0, log_every=1), Repeat(True),
                pretrain_loss, tmp_path, progress=False)
    t.fit()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"]
    assert rows[-1]["tokens"] == 60 * 2 * 4 * 16


# ---- the hooks seam: default_hooks is the one place that wires a run's hooks ------------------------

def _hook_types(hooks):
    return [type(h).__name__ for h in hooks]


def test_default_hooks_are_the_hand_wired_sets():
    """The sets pretrain() and finetune() built by hand before the seam, in the same order: pre-training
    MFU, the caller's hooks, MoE statistics (a routed model), the guard (--train.guard); fine-tuning
    early stopping, keep-best (no checkpoints kept), MoE statistics, the guard with the floor ln K."""
    from pretune.training.hooks import default_hooks

    class Mine(Hook):
        pass

    dense, moe = cfg(True), cfg(True).replace(n_expert=4, top_k=2)
    on, off = TrainConfig(), TrainConfig(guard=False)
    assert _hook_types(default_hooks(moe, on, "pretrain", extra=[Mine()], seq_len=16)) == \
        ["MFUHook", "Mine", "MoEStatsHook", "LossGuard"]
    assert _hook_types(default_hooks(dense, off, "pretrain", seq_len=16)) == ["MFUHook"]
    ft = default_hooks(moe, on, "finetune", patience=3, keep_best=True, n_labels=3)
    assert _hook_types(ft) == ["EarlyStopping", "KeepBest", "MoEStatsHook", "LossGuard"]
    assert ft[0].patience == 3 and ft[-1].floor == pytest.approx(1.0986122886681098)  # ln 3
    assert (ft[-1].factor, ft[-1].window, ft[-1].cooldown) == (on.guard_factor, on.guard_window, on.guard_cooldown)
    assert _hook_types(default_hooks(dense, off, "finetune", patience=None, n_labels=2)) == ["EarlyStopping"]
    pre = default_hooks(dense, on, "pretrain", seq_len=16)
    assert pre[-1].floor == 0.0  # pre-training has no class count: a spike is factor x the median


def test_unknown_hook_or_purpose_is_one_line_with_the_near_name():
    from pretune.errors import PretuneError
    from pretune.training.hooks import default_hooks, get_hook

    with pytest.raises(PretuneError, match="unknown training purpose 'pretrian'.*did you mean pretrain"):
        default_hooks(cfg(True), TrainConfig(), "pretrian")
    with pytest.raises(PretuneError, match="unknown hook 'gaurd'.*did you mean guard"):
        get_hook("gaurd")


def test_a_hook_registered_through_the_seam_runs_in_pretraining_end_to_end(tmp_path, monkeypatch):
    """One `register` call is all a new hook needs: pretrain() (which builds no list of its own) then
    runs it, at its place (before the guard), at every event, and it may add fields to metrics.jsonl."""
    from pretune.data.prepare import prepare
    from pretune.tokenizer.vocabularies import train_tokenizer
    from pretune.training import hooks as H
    from pretune.training.pretrain import pretrain

    monkeypatch.setattr(H, "HOOKS", dict(H.HOOKS))
    monkeypatch.setattr(H, "PURPOSES", {k: list(v) for k, v in H.PURPOSES.items()})
    seen = []

    class Toy(Hook):
        def on_start(self, trainer):
            seen.append(("start", _hook_types(trainer.hooks)))

        def after_step(self, trainer, loss, parts):
            seen.append(("step", trainer.step))

        def on_log(self, trainer, record):
            record["toy"] = trainer.step

    H.register("toy", lambda ctx: Toy() if ctx.model_cfg.n_layer == 1 else None, purposes=("pretrain",),
               before="guard")
    text = "\n\n".join(f"the cat {i} sat on the mat and the dog {i % 7} ran off" for i in range(200))
    (tmp_path / "c.txt").write_text(text)
    tok = train_tokenizer("bpe", 300, text.split("\n\n"))
    prepare([str(tmp_path / "c.txt")], tok, tmp_path / "data", val_fraction=0.2, progress=False)
    mc = ModelConfig(name="t", vocab_size=tok.vocab_size, vocab_multiple=8, max_seq_len=16, n_layer=1,
                     n_head=2, d_model=16, dropout=0.0)
    tc = TrainConfig(steps=4, batch_size=2, log_every=2, eval_every=0, ckpt_every=100, seed=0, device="cpu")
    pretrain(mc, tc, tmp_path / "data", tmp_path / "run", progress=False)
    assert seen[0] == ("start", ["MFUHook", "Toy", "LossGuard"])
    assert [s for k, s in seen if k == "step"] == [1, 2, 3, 4]  # the step count after each step
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["toy"] for r in rows if "toy" in r] == [2, 4]
    # the factory decides per run: a 2-layer model does not get it
    assert "Toy" not in _hook_types(H.default_hooks(mc.replace(n_layer=2), tc, "pretrain"))
