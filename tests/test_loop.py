"""What the docs promise of the training loop, each checked here:

- a training step never makes the host wait for the device (docs/performance.md), except the one
  read the loss guard makes per step (docs/robustness.md);
- a resumed run is bit-identical to an uninterrupted one in bf16, fp16 and with gradient
  accumulation, as in fp32 (docs/training.md);
- a second SIGTERM/SIGINT stops at once, with 128 + the signal; a signal after the last step
  changes nothing (docs/robustness.md, sec. 2);
- metrics.jsonl: each line is one write of a complete line, and a line cut short by a crash is
  dropped by the next run, also one that died before its first checkpoint (docs/training.md).

A host sync cannot be seen on a CPU, so `HostSyncs` records the calls that make one on a GPU
(reading a value: item, float, bool, tolist; nonzero and boolean indexing, whose output size
the host must learn): what `torch.cuda.set_sync_debug_mode("error")` would refuse, which
scripts/gpu_check.py runs on a real device.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pretune import Transformer
from pretune.config.model import ModelConfig
from pretune.objectives.linear_cross_entropy import IGNORE
from pretune.objectives.losses import mlm_loss
from pretune.objectives.masking import mlm_mask, mlm_rows
from pretune.objectives.registry import pretrain_loss
from pretune.runs.checkpoint import latest_checkpoint, list_checkpoints
from pretune.training.config import TrainConfig
from pretune.training.hooks import Hook, LossGuard
from pretune.training.loop import Preempted, Trainer

V, T, B = 50, 16, 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Synthetic:
    """Batch k is a pure function of (seed, k), the loader contract of data/loaders.py; an encoder's
    batches carry mlm_rows as PairBatches' do."""

    def __init__(self, causal, seed=0):
        self.causal, self.seed, self.k = causal, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.k)
        self.k += 1
        x = torch.randint(5, V, (B, T + 1), generator=g)
        if self.causal:
            return {"input_ids": x[:, :-1], "targets": x[:, 1:]}
        ids = x[:, :-1]
        ids[:, 0] = 1
        inp, labels = mlm_mask(ids, ids < 5, 4, V, g)
        labels[:, 1] = ids[:, 1]  # at least one prediction per row
        return {"input_ids": inp, "segment_ids": torch.zeros_like(ids),
                "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels,
                "nsp_labels": torch.randint(0, 2, (B,), generator=g), "mlm_rows": mlm_rows(labels)}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


class Ready(Synthetic):
    """The same batches, made before the step (a loader's work is host work, not a sync)."""

    def __init__(self, causal, n):
        src = Synthetic(causal)
        self.items = [next(src) for _ in range(n)]
        self.k = 0

    def __next__(self):
        self.k += 1
        return self.items[self.k - 1]


def cfg(causal, dropout=0.1):
    kw = dict(name="t", vocab_size=V, max_seq_len=T, n_layer=2, n_head=2, d_model=32, dropout=dropout)
    if not causal:
        kw.update(causal=False, type_vocab_size=2, nsp_head=True, norm_placement="post", embedding_norm=True)
    return ModelConfig(**kw)


_T = torch.Tensor
_READS = {_T.item, _T.tolist, _T.__bool__, _T.__float__, _T.__int__, _T.__index__, _T.numpy, _T.cpu,
          _T.nonzero, torch.nonzero, torch.argwhere, _T.masked_select, torch.masked_select, _T.unique, torch.unique}


class HostSyncs(TorchFunctionMode):
    """Records every call that, on a GPU, makes the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if func in _READS:
            self.calls.append(name)
        elif func in (_T.__getitem__, _T.__setitem__) and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(torch.is_tensor(i) and i.dtype == torch.bool for i in index):
                self.calls.append(f"{name} with a boolean index")
        return func(*args, **(kwargs or {}))


def test_the_sync_detector_sees_what_a_gpu_would_wait_for():
    x = torch.randn(6)
    with HostSyncs() as h:
        y = x * 2  # device work only
        y.sum().item()
        float(y.max())
        y[y > 0]
        y.masked_fill(y > 0, 0.0)  # device work only
    assert h.calls == ["item", "__float__", "__getitem__ with a boolean index"]


# ---- no host sync in a step ---------------------------------------------------------------

@pytest.mark.parametrize("causal,precision,accum", [
    (True, "fp32", 1), (True, "bf16", 1), (True, "fp16", 1), (True, "fp32", 3), (False, "fp32", 1),
    (False, "fp16", 2)], ids=["gpt-fp32", "gpt-bf16", "gpt-fp16", "gpt-accum3", "bert-fp32", "bert-fp16-accum2"])
def test_a_training_step_never_waits_for_the_device(tmp_path, causal, precision, accum):
    """docs/performance.md: no host sync per step. fp16 read the loss scale twice a step to
    count skipped steps (get_scale()); masked-LM gathered its rows with a boolean index."""
    tc = TrainConfig(steps=10, batch_size=B, grad_accum=accum, precision=precision, guard=False, device="cpu",
                     warmup=2)
    t = Trainer(Transformer(cfg(causal)), tc, Ready(causal, 3 * accum), pretrain_loss, tmp_path, progress=False)
    with HostSyncs() as h:
        for _ in range(3):
            t.train_step()
    assert h.calls == []
    if precision == "fp16":
        assert t.skipped_steps == 0 and t.found_inf is not None


@pytest.mark.parametrize("causal,objective", [(True, "L2"), (True, "L3"), (False, "L2"), (False, "L3")])
def test_a_fine_tuning_step_never_waits_for_the_device(tmp_path, causal, objective):
    """The classifier used to ask the device whether a batch had padding (attention_mask.all());
    collate knows it on the host. L3's next-token targets used a boolean index too."""
    from pretune.data.encoding import ClassificationBatches, TextEncoder
    from pretune.data.labelled import Example
    from pretune.tasks.build import build_classifier
    from pretune.objectives.finetuning import finetune_loss
    from pretune.tokenizer.vocabularies import train_tokenizer

    texts = [f"the film was {w} and {v}" + " really" * (i % 5) + f" {i}"
             for i, (w, v) in enumerate(zip("good bad fine dull".split() * 10, "nice grim ok poor".split() * 10))]
    tok = train_tokenizer("bpe", 300, texts) if causal else train_tokenizer("wordpiece", 120, texts)
    c = ModelConfig(name="t", causal=causal, vocab_size=tok.vocab_size, vocab_multiple=8, max_seq_len=32,
                    n_layer=1, n_head=2, d_model=32, type_vocab_size=0 if causal else 2, nsp_head=not causal,
                    embedding_norm=not causal, norm_placement="pre" if causal else "post")
    te = TextEncoder(tok, causal, 32)
    enc = te.encode([Example(x, i % 2) for i, x in enumerate(texts)])
    mlm = None if causal or objective == "L2" else {"mask_id": tok.mask_id, "vocab_size": tok.vocab_size,
                                                    "special_ids": sorted(tok.special_ids)}
    src = ClassificationBatches(enc, 8, 0, te.pad_id, mlm=mlm)
    ready = [next(src) for _ in range(3)]
    assert any(b["padded"] for b in ready)  # the masked path is exercised, not only the fast one
    model = build_classifier(Transformer(c), c, 2)
    t = Trainer(model, TrainConfig(steps=3, batch_size=8, guard=False, device="cpu"), iter(ready),
                finetune_loss(objective), tmp_path, progress=False)
    with HostSyncs() as h:
        for _ in range(3):
            t.train_step()
    assert h.calls == []


def test_the_guard_reads_the_device_once_per_step(tmp_path):
    """docs/robustness.md: the guard's read of loss, gradient norm (and fp16's overflow flag) is
    the one host sync per step, as one read."""
    tc = TrainConfig(steps=10, batch_size=B, precision="fp16", guard=False, device="cpu")
    t = Trainer(Transformer(cfg(True)), tc, Ready(True, 3), pretrain_loss, tmp_path, progress=False)
    guard = LossGuard(verbose=False)
    with HostSyncs() as h:
        for _ in range(3):
            loss, parts = t.train_step()
            t.step += 1
            guard.after_step(t, loss, parts)
    assert h.calls == ["tolist"] * 3 and len(guard.history) == 3


def test_mlm_rows_select_what_a_boolean_index_selects():
    """mlm_loss on the loader's rows equals the boolean-index reference, values and gradients."""
    torch.manual_seed(0)
    model = Transformer(cfg(False, dropout=0.0))
    b = Synthetic(False).__next__()
    h = model(b["input_ids"], segment_ids=b["segment_ids"])
    sel = b["labels"] != IGNORE
    want = F.cross_entropy(model.logits(h[sel])[:, :V].float(), b["labels"][sel])
    got = mlm_loss(model, h, b["labels"], b["mlm_rows"])
    assert torch.equal(got, want) and torch.equal(mlm_loss(model, h, b["labels"]), want)
    gw = torch.autograd.grad(want, model.wte.weight, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(got, model.wte.weight)[0], gw)


# ---- bit-identical resume in every precision ----------------------------------------------

class StopAt(Hook):
    def __init__(self, step):
        self.at = step

    def after_step(self, trainer, loss, parts):
        if trainer.step == self.at:
            trainer.stop_requested = True


def _trainer(run, causal, hooks=(), steps=20, **tc):
    torch.manual_seed(123)
    base = dict(batch_size=B, lr=1e-2, warmup=3, log_every=5, eval_every=0, ckpt_every=100, seed=3, device="cpu",
                guard=False)
    return Trainer(Transformer(cfg(causal)), TrainConfig(steps=steps, **{**base, **tc}), Synthetic(causal),
                   pretrain_loss, run, progress=False, hooks=list(hooks))


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("causal,precision,accum", [
    (True, "bf16", 1), (True, "fp16", 1), (True, "fp32", 2), (False, "bf16", 2), (False, "fp16", 2)],
    ids=["gpt-bf16", "gpt-fp16", "gpt-accum2", "bert-bf16-accum2", "bert-fp16-accum2"])
def test_resume_is_bit_identical_in_half_precision_and_with_accumulation(tmp_path, causal, precision, accum):
    """20 steps straight == 10 steps, a new process state, then resumed for 10 (dropout on, so the
    RNG state must come back; fp16: the loss scale and its growth tracker too)."""
    kw = dict(precision=precision, grad_accum=accum)
    straight = _trainer(tmp_path / "a", causal, **kw)
    straight.fit()
    first = _trainer(tmp_path / "b", causal, [StopAt(10)], **kw)
    first.fit()
    assert first.step == 10
    torch.manual_seed(999)  # another RNG state: the checkpoint must restore it
    second = _trainer(tmp_path / "b", causal, **kw)
    second.fit()
    assert second.step == 20
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(straight.model.named_buffers(), second.model.named_buffers()):
        assert torch.equal(p, q), n
    sa, sb = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert [r["loss"] for r in _rows(tmp_path / "a")] == [r["loss"] for r in _rows(tmp_path / "b")]
    if precision == "fp16":
        assert straight.scaler.state_dict() == second.scaler.state_dict()
        assert straight.skipped_steps == second.skipped_steps


# ---- signals ----------------------------------------------------------------------------

class Kill(Hook):
    """Sends this process `times` SIGTERMs as step `at` + 1 begins ("before_step"), or while the
    final checkpoint is written ("final_checkpoint")."""

    def __init__(self, at, times, where="before_step"):
        self.at, self.times, self.where = at, times, where

    def _maybe(self, trainer):
        if trainer.step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler as os.kill returns

    def before_step(self, trainer):
        if self.where == "before_step":
            self._maybe(trainer)

    def on_checkpoint(self, trainer, path):
        if self.where == "final_checkpoint" and trainer.step == trainer.tc.steps:
            self._maybe(trainer)


def test_a_second_signal_stops_at_once_and_the_checkpoints_stay_good(tmp_path, capfd):
    run = tmp_path / "run"
    t = _trainer(run, True, [Kill(7, 2)], ckpt_every=5)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as e:
        t.fit()
    assert e.value.code == 128 + signal.SIGTERM  # what the process exits with, as for one signal
    assert t.step == 7  # step 8 never ran: stopped at once, not after finishing it
    assert [p.name for p in list_checkpoints(run)] == ["step-000005"]  # no checkpoint for the stop
    assert latest_checkpoint(run).name == "step-000005"  # ... and that one verifies
    err = capfd.readouterr().err
    assert "SIGTERM again: stopped at once at step 7/20" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handlers are given back
    # the rerun resumes from step 5 and ends as an uninterrupted run
    again = _trainer(run, True, ckpt_every=5)
    again.fit()
    straight = _trainer(tmp_path / "straight", True, ckpt_every=5)
    straight.fit()
    for p, q in zip(straight.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_a_signal_after_the_last_step_changes_nothing(tmp_path, capfd):
    """Arriving while the final checkpoint is written: no Preempted, the run ends as finished
    (exit status 0), its final checkpoint and evaluation in place."""
    run = tmp_path / "run"
    t = _trainer(run, True, [Kill(20, 1, where="final_checkpoint")], steps=20, ckpt_every=5)
    t.eval_fn = lambda: {"val_loss": 1.0}
    final = t.fit()  # returns: nothing raised
    assert t.stop_signal == signal.SIGTERM and t.step == 20 and final["val_loss"] == 1.0
    assert latest_checkpoint(run).name == "step-000020"
    assert "all 20 steps are done" in capfd.readouterr().err


def test_the_cli_exits_0_for_a_signal_after_the_last_step(tmp_path, monkeypatch):
    """The same through `pretune pretrain`: main() returns 0 (Preempted would be exit 143)."""
    from pretune import cli
    from pretune.training import loop as train

    real = train.Trainer.save

    def save_then_signal(self):
        path = real(self)
        if self.step == self.tc.steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    monkeypatch.setattr(train.Trainer, "save", save_then_signal)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"Document {i}. The fox jumps over the dog {i % 7} times." for i in range(60)))
    from pretune.tokenizer.vocabularies import train_tokenizer
    train_tokenizer("bpe", 300, corpus.read_text().split("\n\n")).save(tmp_path / "bpe.json")
    assert cli.main(["prepare", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "bpe.json"),
                     "--out", str(tmp_path / "data"), "--val-fraction", "0.2"]) == 0
    assert cli.main(["pretrain", "--model", "gpt-mini", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                     "--model.vocab-size", "320", "--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2",
                     "--model.max-seq-len", "16", "--train.steps", "3", "--train.batch-size", "2",
                     "--train.eval-batches", "1", "--train.device", "cpu"]) == 0


# ---- metrics.jsonl ------------------------------------------------------------------------

def test_each_metrics_line_is_one_write_of_a_complete_line(tmp_path, monkeypatch):
    import io
    writes = []
    real = io.FileIO.write

    class Recording(io.FileIO):
        def write(self, b):
            if str(self.name).endswith("metrics.jsonl"):
                writes.append(bytes(b))
            return real(self, b)

    import builtins
    real_open = builtins.open

    def open_(file, mode="r", buffering=-1, *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            assert buffering == 0  # unbuffered: the line goes down in the write below, whole
            return Recording(file, mode)
        return real_open(file, mode, buffering, *a, **k)

    monkeypatch.setattr(builtins, "open", open_)
    t = _trainer(tmp_path, True, steps=10, log_every=2)
    t.eval_fn = lambda: {"val_loss": 2.0}
    t.fit()
    assert len(writes) == 5 + 1  # five log steps and the final evaluation
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 and isinstance(json.loads(w), dict) for w in writes)


def test_a_line_cut_short_by_a_crash_is_dropped_by_the_resume(tmp_path):
    straight = _trainer(tmp_path / "a", True, ckpt_every=5)
    straight.fit()
    run = tmp_path / "b"
    _trainer(run, True, [StopAt(10)], ckpt_every=5).fit()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 3.1')  # a crash in the middle of step 11's line
    _trainer(run, True, ckpt_every=5).fit()
    assert (run / "metrics.jsonl").read_text().count("\n") == len(_rows(run))
    assert [(r["step"], r["loss"]) for r in _rows(run)] == [(r["step"], r["loss"]) for r in _rows(tmp_path / "a")]


def test_a_run_that_died_before_its_first_checkpoint_starts_its_log_over(tmp_path):
    """No checkpoint: the rerun starts at step 0, so the dead run's lines (and its cut-short last
    one, which the first new line would have been glued to) are from a future that did not happen."""
    straight = _trainer(tmp_path / "a", True, ckpt_every=100)
    straight.fit()
    run = tmp_path / "b"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 9.0}\n{"step": 10, "loss": 8.0}\n{"step": 15, "lo')
    _trainer(run, True, ckpt_every=100).fit()
    assert (run / "metrics.jsonl").read_text().count("\n") == len(_rows(run))  # every line whole
    assert [(r["step"], r["loss"]) for r in _rows(run)] == [(r["step"], r["loss"]) for r in _rows(tmp_path / "a")]


def test_a_second_signal_ends_the_process_with_143(tmp_path):
    """The same in a process of its own: the exit status a scheduler sees, one line, no traceback."""
    import subprocess
    import sys
    script = tmp_path / "two_signals.py"
    script.write_text(f"""
import os, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_loop import Kill, _trainer
torch.set_num_threads(1)
_trainer(__import__("pathlib").Path({str(tmp_path / "run")!r}), True, [Kill(3, 2)], ckpt_every=2).fit()
""")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("pretune: SIGTERM again: stopped at once at step 3/20")
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step-000002"]
