"""Exact resume, proven by killing the real command.

Each run is `pretune pretrain ...` (the CLI's `main`) in its own process. With
PRETUNE_FAULT=<point>:<n> the process sends itself SIGKILL the n-th time it
passes <point>; the same command is then rerun without the fault, and its final
weights must equal, bit for bit, those of a run that was never interrupted (same
seed, CPU). For GPT (L1), BERT (MLM + NSP) and fine-tuning (L3 on the GPT run),
with dropout on (so the RNG state must come back too). Plus: SIGKILL from outside at a seeded random moment, and
SIGTERM / SIGINT (finish the step, checkpoint, exit 143 / 130, resume).

Most runs are forked from a forkserver that has imported torch and pretune
once (an import costs seconds on a shared machine; a fork, milliseconds), with
one intra-op thread; the SIGTERM and outside-kill runs are real
`python -m pretune` subprocesses and are compared with the forked baseline.
"""

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretune.runs.checkpoint import FAULT_POINTS

TEXT = "\n\n".join(
    f"Document {i}. The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
    f"and the clocks were striking {i % 13}. Call me Ishmael. Some years ago, never mind how long."
    for i in range(120))

TINY = ["--model.vocab-size", "320", "--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2",
        "--model.max-seq-len", "32", "--model.dropout", "0.1"]
TRAIN = ["--train.steps", "20", "--train.batch-size", "4", "--train.seq-len", "32", "--train.log-every", "1",
         "--train.eval-every", "10", "--train.eval-batches", "2", "--train.warmup", "2", "--train.ckpt-every", "5",
         "--train.keep-last", "2", "--train.lr", "3e-3", "--train.device", "cpu"]  # bit-identical: on the CPU
# The guard (on by default) writes step 0 first: saves happen at steps 0, 5, 10, 15, 20.
POINTS = {  # PRETUNE_FAULT -> the checkpoint the rerun resumes from
    "after_forward:13": 10,      # mid step 13
    "in_optimizer_step:8": 5,    # step 8: gradients ready, weights not yet updated
    "after_weights:3": 5,        # saving step 10: weights written, nothing else
    "before_manifest:2": 0,      # saving step 5: all files fsynced, no manifest
    "before_rename:4": 10,       # saving step 15: manifest written, not renamed into place
}
assert {p.split(":")[0] for p in POINTS} == set(FAULT_POINTS)
# Fine-tuning (10 steps; the guard, on by default there too, writes step 0 first): saves at steps 0, 3, 6, 9, 10.
FT_POINTS = {"after_forward:8": 6, "in_optimizer_step:5": 3, "after_weights:3": 3, "before_manifest:4": 6,
             "before_rename:3": 3}
assert {p.split(":")[0] for p in FT_POINTS} == set(FAULT_POINTS)

ENV = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def _child(argv, env, log):
    """Runs in a process forked from the forkserver: the real CLI entry point."""
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    from pretune.cli import main
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def ctx():
    os.environ.update(ENV)  # inherited by the forkserver
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["torch", "torch._dynamo", "pretune.planning.cost", "pretune.cli",
                              "pretune.training.pretrain", "pretune.data.prepare", "pretune.data.loaders",
                              "pretune.training.hooks", "pretune.objectives.losses", "pretune.runs.plots", "pretune.tasks.finetune",
                              "pretune.data.labelled", "pretune.data.encoding", "matplotlib.pyplot", "tqdm"])  # torch._dynamo: the optimizer imports it, 3 s
    return c


def cli(ctx, argv, fault=None, log=None):
    """Run `pretune <argv>` in a forked process; its exit code (-9: killed by SIGKILL)."""
    env = {"PRETUNE_FAULT": fault} if fault else {}
    p = ctx.Process(target=_child, args=(argv, env, str(log or os.devnull)))
    p.start()
    p.join(300)
    return p.exitcode


@pytest.fixture(scope="module")
def data(tmp_path_factory, ctx):
    """Tiny prepared folders (a 320-token byte-level BPE, a 320-token WordPiece, trained here)."""
    from pretune.tokenizer.vocabularies import train_tokenizer
    d = tmp_path_factory.mktemp("faults")
    (d / "corpus.txt").write_text(TEXT)
    out = {}
    for kind in ("bpe", "wordpiece"):
        train_tokenizer(kind, 320, TEXT.split("\n\n")).save(d / f"{kind}.json")
        assert cli(ctx, ["prepare", "--corpus", str(d / "corpus.txt"), "--tokenizer", str(d / f"{kind}.json"),
                         "--out", str(d / f"data-{kind}"), "--val-fraction", "0.2"], log=d / "prepare.log") == 0, \
            (d / "prepare.log").read_text()
        out[kind] = d / f"data-{kind}"
    return out


def command(family, data, run):
    model, kind = ("gpt-mini", "bpe") if family == "gpt" else ("bert-mini", "wordpiece")
    return ["pretrain", "--model", model, "--data", str(data[kind]), "--out", str(run), *TINY, *TRAIN]


def final_weights(run, step=20):
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


def assert_same_run(run, base, step=20):
    a, b = final_weights(run, step), final_weights(base, step)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(run) == losses(base)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ctx, data):
    d = tmp_path_factory.mktemp("baseline")
    out = {}
    for family in ("gpt", "bert"):
        assert cli(ctx, command(family, data, d / family), log=d / f"{family}.log") == 0, \
            (d / f"{family}.log").read_text()
        out[family] = d / family
    return out


@pytest.mark.parametrize("family", ["gpt", "bert"])
@pytest.mark.parametrize("fault", list(POINTS))
def test_killed_at_each_fault_point_then_resumed_is_bit_identical(tmp_path, ctx, data, baseline, family, fault):
    run, log = tmp_path / "run", tmp_path / "log"
    assert cli(ctx, command(family, data, run), fault=fault, log=log) == -signal.SIGKILL
    cks = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert cks[-1] == f"step-{POINTS[fault]:06d}", cks
    assert cli(ctx, command(family, data, run), log=log) == 0, log.read_text()
    assert f"from step {POINTS[fault]}" in log.read_text()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert_same_run(run, baseline[family])


def _wait_for_step(run, proc, step, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        mp_ = run / "metrics.jsonl"
        if mp_.exists():
            rows = [l for l in mp_.read_text().splitlines() if l.strip()]
            try:
                if rows and json.loads(rows[-1]).get("step", 0) >= step:
                    return
            except ValueError:
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("the run did not get there")


def _python_m(argv):
    return subprocess.Popen([sys.executable, "-m", "pretune", *argv], env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_from_outside_at_a_random_moment(tmp_path, ctx, data, baseline):
    rng = random.Random(6)
    run = tmp_path / "run"
    p = _python_m(command("gpt", data, run))
    _wait_for_step(run, p, rng.randint(3, 16))
    time.sleep(rng.uniform(0.0, 0.1))
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert cli(ctx, command("gpt", data, run), log=tmp_path / "log") == 0
    assert_same_run(run, baseline["gpt"])


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tmp_path, ctx, data, baseline):
    run = tmp_path / "run"
    p = _python_m(command("bert", data, run))
    _wait_for_step(run, p, 6)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pretune: stopped by SIGTERM at step ") and last.endswith("resume with the same command")
    stopped = int(last.split("at step ")[1].split("/")[0])
    assert 6 <= stopped < 20 and (run / "checkpoints" / f"step-{stopped:06d}" / "manifest.json").exists()
    assert cli(ctx, command("bert", data, run), log=tmp_path / "log") == 0
    assert f"from step {stopped}" in (tmp_path / "log").read_text()
    assert_same_run(run, baseline["bert"])


def test_sigint_is_the_same_with_130(tmp_path, ctx, data, baseline):
    run, log = tmp_path / "run", tmp_path / "log"
    p = ctx.Process(target=_child, args=(command("gpt", data, run), {}, str(log)))
    p.start()
    t0 = time.time()
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 4:
        assert time.time() - t0 < 120 and p.is_alive(), log.read_text()
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGINT)
    p.join(120)
    assert p.exitcode == 128 + signal.SIGINT, log.read_text()
    assert "resume with the same command" in log.read_text()
    assert cli(ctx, command("gpt", data, run), log=log) == 0
    assert_same_run(run, baseline["gpt"])


# ---- fine-tuning --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ft(tmp_path_factory, ctx, baseline):
    """A labelled .csv (two classes) and an uninterrupted fine-tuning of the GPT baseline on it."""
    d = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    good, bad = "good great fine lovely nice superb".split(), "bad awful poor dull ugly grim".split()
    rows = [f"the film was {rng.choice(good if i % 2 else bad)} and {rng.choice(good if i % 2 else bad)},"
            f"{'pos' if i % 2 else 'neg'}" for i in range(80)]
    (d / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")

    def cmd(run):
        return ["finetune", "--init", str(baseline["gpt"]), "--task", str(d / "task.csv"), "--finetune.objective", "L3",
                "--finetune.epochs", "2", "--train.batch-size", "8", "--train.lr", "1e-3", "--out", str(run), "--train.ckpt-every", "3",
                "--train.log-every", "1", "--train.eval-every", "4", "--train.device", "cpu"]
    assert cli(ctx, cmd(d / "base"), log=d / "log") == 0, (d / "log").read_text()
    assert json.loads((d / "base" / "results.json").read_text())["steps"] == 10
    return cmd, d / "base"


@pytest.mark.parametrize("fault", list(FT_POINTS))
def test_finetune_killed_at_each_fault_point_then_resumed_is_bit_identical(tmp_path, ctx, ft, fault):
    cmd, base = ft
    run, log = tmp_path / "run", tmp_path / "log"
    assert cli(ctx, cmd(run), fault=fault, log=log) == -signal.SIGKILL
    cks = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert cks[-1] == f"step-{FT_POINTS[fault]:06d}", cks
    assert cli(ctx, cmd(run), log=log) == 0, log.read_text()
    assert f"from step {FT_POINTS[fault]}" in log.read_text()
    assert_same_run(run, base, step=10)
    a, b = (json.loads((r / "results.json").read_text()) for r in (run, base))
    assert a["test"] == b["test"] and a["best_step"] == b["best_step"]
