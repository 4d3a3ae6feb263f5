"""Rerunning a run resumes it only on the same trajectory: every option that decides the weights
(the model, seed, batch size, grad_accum, seq_len, the data, the schedule, precision, the
objective, for fine-tuning the task and its encoded examples, the head, freezing) is compared
with the run's run.json, and a change is refused in one line naming it, with run.json
and everything else in the run left as it was. What may change, and what it does, is in
docs/training.md ("Resuming: what a rerun may change"); those changes resume."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretune.cli import main

TEXT = "\n\n".join(f"Document {i}. The quick brown fox jumps over the lazy dog, and the clocks were striking "
                   f"{i % 13}. Call me Ishmael. Some years ago, never mind how long." for i in range(80))
TINY = ["--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2", "--model.max-seq-len", "32",
        "--model.vocab-size", "320"]
TRAIN = ["--train.steps", "2", "--train.batch-size", "2", "--train.seq-len", "32", "--train.eval-batches", "1",
         "--train.log-every", "1", "--train.device", "cpu",
         "--train.warmup", "100"]  # the old default, explicit: within warmup the lr does not depend on the total


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A corpus prepared twice (two different held-out shares: two data folders), a 2-step GPT run
    on the first, a 2-step fine-tuning of it on a small task."""
    from pretune.tokenizer.vocabularies import train_tokenizer
    d = tmp_path_factory.mktemp("resume")
    (d / "corpus.txt").write_text(TEXT)
    train_tokenizer("bpe", 320, TEXT.split("\n\n")).save(d / "bpe.json")
    for name, frac in (("data", "0.2"), ("data-other", "0.3")):
        assert main(["prepare", "--corpus", str(d / "corpus.txt"), "--tokenizer", str(d / "bpe.json"),
                     "--out", str(d / name), "--val-fraction", frac]) == 0
    assert main(_gpt(d, d / "gpt")) == 0
    rows = [f"the film was {'good' if i % 2 else 'bad'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(60)]
    (d / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    assert main(_ft(d, d / "ft")) == 0
    return d


def _gpt(w, out, *extra, data=None):
    return ["pretrain", "--model", "gpt-mini", "--data", str(data or w / "data"), "--out", str(out), *TINY, *TRAIN,
            *extra]


def _ft(w, out, *extra, task=None):
    return ["finetune", "--init", str(w / "gpt"), "--task", str(task or w / "task.csv"), "--finetune.epochs", "1",
            "--train.batch-size", "16", "--train.seed", "0", "--out", str(out), *extra]


def listing(root: Path) -> dict:
    """Every file under root with its size, modification time and (for run.json) bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = Path(dirpath) / n
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, p.read_bytes() if n == "run.json" else 0)
    return out


def refused(capsys, argv, run) -> str:
    before = listing(run)
    capsys.readouterr()
    assert main(argv) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("pretune: error: "), err
    assert listing(run) == before  # run.json (bytes), checkpoints, metrics: untouched
    return err[0]


# (the option's flag and new value, the fragment naming the change, whether --train.allow-change may pass it)
PRETRAIN_REFUSED = [
    (["--train.seed", "7"], "the run was started with seed=1337, now seed=7", False),
    (["--train.batch-size", "4"], "global_batch=2, now global_batch=4", False),  # the step's batch over all ranks
    (["--train.grad-accum", "2"], "global_batch=2, now global_batch=4", False),
    (["--train.seq-len", "16"], "seq_len=32, now seq_len=16", False),
    (["--train.precision", "bf16"], "precision='fp32', now precision='bf16'", False),
    (["--train.weight-decay", "0.0"], "weight_decay=0.1, now weight_decay=0.0", False),
    (["--train.beta2", "0.99"], "beta2=0.95, now beta2=0.99", False),
    (["--model.dropout", "0.2"], "dropout=0.0, now dropout=0.2", False),
    (["--train.lr", "0.001"], "lr=0.0006, now lr=0.001", True),
    (["--train.warmup", "5"], "warmup=100, now warmup=5", True),
    (["--train.decay", "linear"], "decay='cosine', now decay='linear'", True),
    (["--train.min-lr-ratio", "0.5"], "min_lr_ratio=0.1, now min_lr_ratio=0.5", True),
    (["--train.grad-clip", "0.5"], "grad_clip=1.0, now grad_clip=0.5", True),
    (["--train.guard", "false"], "guard=True, now guard=False", True),
]


@pytest.mark.parametrize("extra,needle,deliberate", PRETRAIN_REFUSED, ids=[c[0][0][2:] for c in PRETRAIN_REFUSED])
def test_pretrain_rerun_with_a_changed_option_is_refused(w, tmp_path, capsys, extra, needle, deliberate):
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    err = refused(capsys, _gpt(w, run, *extra), run)
    assert needle in err and f"({run})" in err, err
    assert ("--train.allow-change" in err) == deliberate, err


def test_pretrain_rerun_on_other_data_is_refused(w, tmp_path, capsys):
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    err = refused(capsys, _gpt(w, run, data=w / "data-other"), run)
    # the run records its data relative to itself (w/data next to w/gpt: ../data); moved, it is not there
    assert "the run was started on the data ../data (meta.json sha256 " in err, err
    assert f"now on the data {w / 'data-other'} (meta.json sha256 " in err, err


def test_several_changes_are_named_in_one_line(w, tmp_path, capsys):
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    err = refused(capsys, _gpt(w, run, "--train.seed", "7", "--train.batch-size", "4"), run)
    assert "now global_batch=4 (and 1 more: seed)" in err, err


def _weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def test_free_changes_resume_on_the_same_trajectory(w, tmp_path, capsys):
    """2 steps, then a rerun to 4 steps with other logging, evaluation and checkpoint cadences,
    from a moved copy of the data folder: bit-identical to 4 steps straight. (Within the 100
    warmup steps the lr does not depend on the total, so here more steps changes nothing else.)"""
    straight = tmp_path / "straight"
    assert main(_gpt(w, straight, "--train.steps", "4")) == 0
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    moved = shutil.copytree(w / "data", tmp_path / "moved-data")
    capsys.readouterr()
    assert main(_gpt(w, run, "--train.steps", "4", "--train.log-every", "2", "--train.eval-every", "1",
                     "--train.ckpt-every", "1", "--train.keep-last", "1", "--train.eval-batches", "2",
                     data=moved)) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} from step 2" in out and "steps: 2 -> 4" in out, out
    a, b = _weights(straight, 4), _weights(run, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["train"]["steps"] == 4 and cfg["data"] == "../moved-data"  # the command now in force, relative to the run


def test_more_steps_stretch_the_schedule_from_the_resume_step(w, tmp_path):
    """warmup 1, cosine: the first 2 steps follow the 2-step schedule, the next 2 the 4-step one
    (docs/training.md), by hand: lr(s) = floor + (peak - floor)(1 + cos(pi (s - 1) / (N - 1))) / 2."""
    run = tmp_path / "run"
    assert main(_gpt(w, run, "--train.warmup", "1")) == 0
    assert main(_gpt(w, run, "--train.warmup", "1", "--train.steps", "4")) == 0
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if "loss" in r}
    peak, floor = 6e-4, 6e-5

    def cosine(s, total):
        return floor + (peak - floor) * (1 + math.cos(math.pi * (s - 1) / (total - 1))) / 2

    # metrics' lr at step k is the lr step k was taken with, the schedule's value at k - 1
    expected = {1: peak / 1, 2: cosine(1, 2), 3: cosine(2, 4), 4: cosine(3, 4)}
    assert lrs.keys() == expected.keys()
    for k in expected:
        assert lrs[k] == pytest.approx(expected[k], rel=1e-12), (k, lrs)
    assert cosine(1, 2) == peak and cosine(3, 4) == pytest.approx(floor + (peak - floor) / 4)


def test_fewer_steps_than_done_ends_the_run_where_it_is(w, tmp_path):
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    metrics, cks = (run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(_gpt(w, run, "--train.steps", "1")) == 0
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained, the final evaluation not repeated
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == cks and cks[-1] == "step-000002"


def test_allow_change_lets_a_schedule_change_through_and_records_it(w, tmp_path, capsys):
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    assert main(_gpt(w, run, "--train.steps", "3", "--train.lr", "0.001", "--train.allow-change", "lr")) == 0
    assert "lr: 0.0006 -> 0.001" in capsys.readouterr().out
    last = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l][-1]
    assert last["step"] == 3 and last["lr"] == pytest.approx(0.001 * 3 / 100)  # warmup: peak * (2 + 1) / 100
    assert json.loads((run / "run.json").read_text())["train"]["lr"] == 0.001
    # the new lr is now the run's own: a rerun with it needs no allow-change, the old one does
    assert main(_gpt(w, run, "--train.steps", "3", "--train.lr", "0.001")) == 0
    err = refused(capsys, _gpt(w, run, "--train.steps", "3"), run)
    assert "lr=0.001, now lr=0.0006" in err


def test_allow_change_only_takes_schedule_options(w, tmp_path, capsys):
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    err = refused(capsys, _gpt(w, run, "--train.seed", "7", "--train.allow-change", "seed"), run)
    assert "allow_change names 'seed', which a resume never changes" in err, err
    err = refused(capsys, _gpt(w, run, "--train.allow-change", "steps"), run)
    assert "allow_change names 'steps', which a resume may change anyway" in err, err


# ---- fine-tuning ---------------------------------------------------------------------

FINETUNE_REFUSED = [
    (["--train.seed", "1"], "seed=0, now seed=1"),
    (["--train.batch-size", "8"], "global_batch=16, now global_batch=8"),
    (["--train.lr", "0.001"], "lr=6.25e-05, now lr=0.001"),  # GPT-1's fine-tuning lr (config/training_recipes.py)
    (["--finetune.freeze", "embeddings"], "freeze='nothing', now freeze='the embeddings'"),
    (["--finetune.pool", "mean"], "pool='last', now pool='mean'"),
    (["--finetune.objective", "L3"], "objective='L2', now objective='L3'"),
    (["--finetune.lam", "0.1"], "lam=0.5, now lam=0.1"),
    (["--finetune.max-len", "31"], "max_len=32, now max_len=31"),
    (["--finetune.train-examples", "20"], "train_examples="),
    (["--finetune.dropout", "0.3"], "dropout=0.0, now dropout=0.3"),
]


@pytest.mark.parametrize("extra,needle", FINETUNE_REFUSED, ids=[c[0][0][2:] for c in FINETUNE_REFUSED])
def test_finetune_rerun_with_a_changed_option_is_refused(w, tmp_path, capsys, extra, needle):
    run = shutil.copytree(w / "ft", tmp_path / "ft")
    err = refused(capsys, _ft(w, run, *extra), run)
    assert needle in err and f"({run})" in err, err


def test_finetune_rerun_on_changed_examples_is_refused(w, tmp_path, capsys):
    """Same file name, one label flipped: the encoded training examples differ."""
    run = shutil.copytree(w / "ft", tmp_path / "ft")
    task = tmp_path / "task.csv"
    rows = (w / "task.csv").read_text().splitlines()
    task.write_text("\n".join(rows[:1] + [r.replace(",pos", ",neg") if i == 1 else r
                                         for i, r in enumerate(rows[1:])]) + "\n")
    assert task.read_text() != (w / "task.csv").read_text()
    err = refused(capsys, _ft(w, run, task=task), run)
    assert "the run was started on training examples with sha256 " in err, err


def test_finetune_more_epochs_resume(w, tmp_path, capsys):
    run = shutil.copytree(w / "ft", tmp_path / "ft")
    done = json.loads((run / "results.json").read_text())["steps"]
    capsys.readouterr()
    assert main(_ft(w, run, "--finetune.epochs", "2")) == 0
    assert f"resuming {run} from step {done}" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text())["steps"] == 2 * done
