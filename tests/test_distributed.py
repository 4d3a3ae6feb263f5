"""Data parallelism under torchrun, on the CPU with gloo (docs/distributed.md).

Each run is the real command, `python -m torch.distributed.run --nproc-per-node N -m pretune
pretrain ...` (or the same without torchrun for the one-process run), tiny models, one thread
per rank, dropout 0 and fp32 where runs are compared: 2-process DDP equals the one-process run
of the same global batch (every logged loss and the final weights, allclose 1e-5) for GPT (L1)
and BERT (MLM + NSP); the union of the ranks' batches of step k is the one-process batch of step
k; a distributed checkpoint holds no pickle and resumes at another world size (2 -> 1, 1 -> 2)
as the uninterrupted run. Select them with `pytest tests/test_distributed.py` or `-m distributed`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(
    f"Document {i}. The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
    f"and the clocks were striking {i % 13}. Call me Ishmael. Some years ago, never mind how long."
    for i in range(120))
TINY = ["--model.vocab-size", "320", "--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2",
        "--model.max-seq-len", "32", "--model.dropout", "0"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
           "PRETUNE_DIST_TIMEOUT": "60",  # a collective left hanging by a dead rank fails, and torchrun restarts
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_port()), *extra, "-m", "pretune"]


def pretune(args, nproc=0, timeout=240, extra=(), env=None):
    """`pretune ARGS` in one process (nproc 0) or under torchrun with nproc ranks; the result."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_port()), *extra, "-m", "pretune", *args]
    else:
        cmd = [sys.executable, "-m", "pretune", *args]
    return subprocess.run(cmd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pretune.cli import main
    from pretune.tokenizer.vocabularies import train_tokenizer
    d = tmp_path_factory.mktemp("dist")
    (d / "corpus.txt").write_text(TEXT)
    out = {}
    for kind in ("bpe", "wordpiece"):
        train_tokenizer(kind, 320, TEXT.split("\n\n")).save(d / f"{kind}.json")
        assert main(["prepare", "--corpus", str(d / "corpus.txt"), "--tokenizer", str(d / f"{kind}.json"),
                     "--out", str(d / f"data-{kind}"), "--val-fraction", "0.2"]) == 0
        out[kind] = d / f"data-{kind}"
    return out


def command(family, data, run, steps=6, batch=4, *more):
    model, kind = ("gpt-mini", "bpe") if family == "gpt" else ("bert-mini", "wordpiece")
    return ["pretrain", "--model", model, "--data", str(data[kind]), "--out", str(run), *TINY,
            "--train.steps", str(steps), "--train.batch-size", str(batch), "--train.seq-len", "32",
            "--train.log-every", "1", "--train.eval-every", "0", "--train.eval-batches", "2",
            "--train.warmup", "2", "--train.ckpt-every", "3", "--train.lr", "3e-3", "--train.device", "cpu",
            *more]


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(run, step=6):
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def assert_same_run(a, b, step=6):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == step
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-5)
    # the final validation (fixed batches of the global batch, at any micro-batch x world)
    va, vb = ([r for r in map(json.loads, (x / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
              for x in (a, b))
    assert len(va) == len(vb) >= 1 and sorted(va[-1]) == sorted(vb[-1])
    for k in va[-1]:
        assert abs(va[-1][k] - vb[-1][k]) < 1e-5, (k, va[-1], vb[-1])
    wa, wb = weights(a, step), weights(b, step)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)


def ok(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Runs made once and shared (each a real command): runs(name) -> its run directory."""
    root, made = tmp_path_factory.mktemp("runs"), {}
    recipes = {  # name -> (family, nproc, micro-batch, more options); 6 steps, checkpoints at 0, 3, 6
        "gpt-1": ("gpt", 0, 8, ()), "bert-1": ("bert", 0, 8, ()),
        "gpt-ddp": ("gpt", 2, 4, ("--train.log", "tensorboard")), "bert-ddp": ("bert", 2, 4, ()),
        "gpt-fsdp": ("gpt", 2, 4, ("--train.parallel", "fsdp")),
        "bert-fsdp": ("bert", 2, 4, ("--train.parallel", "fsdp")),
    }

    def get(name):
        if name not in made:
            family, nproc, batch, more = recipes[name]
            ok(pretune(command(family, data, root / name, 6, batch, *more), nproc=nproc))
            made[name] = root / name
        return made[name]
    return get


@pytest.mark.parametrize("family,parallel", [("gpt", "ddp"), ("bert", "ddp"), ("gpt", "fsdp"), ("bert", "fsdp")],
                         ids=["gpt-L1-ddp", "bert-MLM+NSP-ddp", "gpt-L1-fsdp", "bert-MLM+NSP-fsdp"])
def test_two_processes_equal_one_process_of_the_same_global_batch(runs, family, parallel):
    assert_same_run(runs(f"{family}-1"), runs(f"{family}-{parallel}"))
    # one set of outputs: rank 0's metrics.jsonl, one line per step
    rows = (runs(f"{family}-{parallel}") / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if '"loss"' in r] == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_is_the_same_global_batch(tmp_path, data, runs):
    """2 ranks x micro 2 x accumulation 2 (no all-reduce per micro-batch: no_sync) = 1 x 8: MLM's
    varying masked count per micro-batch and rank normalised by the global count."""
    ok(pretune(command("bert", data, tmp_path / "two", 6, 2, "--train.global-batch", "8"), nproc=2))
    assert_same_run(runs("bert-1"), tmp_path / "two")


def test_the_union_of_the_ranks_batches_is_the_one_process_batch(data):
    from pretune.data.loaders import training_batches
    from pretune.tokenizer.core import Tokenizer
    for name, kind in (("windows", "bpe"), ("pairs", "wordpiece")):
        tok = Tokenizer.load(data[kind])
        one = training_batches(name, data[kind], 8, 32, 5, tok)
        ranks = [training_batches(name, data[kind], 2, 32, 5, tok).partition(r, 2, 2) for r in range(2)]
        for step in range(3):
            full = next(one)
            parts = {}
            for a in range(2):  # micro-batch a of rank r: rows (a W + r) B ...
                for r in range(2):
                    parts[a * 2 + r] = next(ranks[r])
            for k in full:
                if k == "mlm_rows":
                    continue
                torch.testing.assert_close(torch.cat([parts[i][k] for i in range(4)]), full[k], rtol=0, atol=0)
            # disjoint rows: each rank reads its own part
            assert not torch.equal(parts[0]["input_ids"], parts[1]["input_ids"])
        st = ranks[0].state_dict()
        assert st["batch"] == 3 and st["micro"] == 0


def test_fine_tuning_batches_of_the_ranks_are_the_one_process_batch():
    """ClassificationBatches: 2 ranks x 2 rows x accumulation 2 = 1 x 8 at every step of an epoch
    of 17 examples (its last batch: 1 row, so three micro-batches are stand-ins that predict
    nothing), the MLM masks of each example the same wherever it lands."""
    import random
    from pretune.data.encoding import ClassificationBatches, Encoded
    from pretune.objectives.linear_cross_entropy import IGNORE
    from pretune.objectives.losses import loss_counts
    rnd = random.Random(0)
    ids = [[1] + [rnd.randrange(5, 50) for _ in range(rnd.randint(2, 12))] + [2] for _ in range(17)]
    enc = Encoded(ids, None, [i % 2 for i in range(17)])
    mlm = {"mask_id": 3, "vocab_size": 50, "special_ids": [0, 1, 2, 3]}
    one = ClassificationBatches(enc, 8, 5, 0, mlm=mlm)
    ranks = [ClassificationBatches(enc, 2, 5, 0, mlm=mlm).partition(r, 2, 2) for r in range(2)]
    assert one.per_epoch == ranks[0].per_epoch == 3

    def rows(b):  # example -> (its tokens, masked input, labels), padding cut off
        return {tuple(b["input_ids"][i, :n].tolist()): (b["mlm_input_ids"][i, :n].tolist(), b["mlm_labels"][i, :n].tolist())
                for i, n in enumerate(b["lengths"].tolist())}
    short = []
    for step in range(4):  # an epoch and the first step of the next
        full = next(one)
        parts = [next(ranks[r]) for a in range(2) for r in range(2)]  # micro-batch a of rank r: part a W + r
        real = [p for p in parts if not p.get("void")]
        assert sum(len(p["labels"]) for p in real) == len(full["labels"])
        got = {}
        for p in real:
            got.update(rows(p))
        assert got == rows(full)  # the same examples, the same masks
        for p in parts:
            if p.get("void"):
                assert all(int(v) == 0 for v in loss_counts(p).values())
        if len(full["labels"]) == 1:  # the epoch's short batch (its place in the epoch is shuffled)
            short.append(step)
            assert len(real) == 1
        assert all((p["mlm_labels"] != IGNORE).any() for p in real)
    assert len([s for s in short if s < 3]) == 1


def _at_step_3(run, dest):
    """A copy of `run` as it was after step 3 (its later checkpoint removed; the resume drops the
    metrics after its checkpoint)."""
    import shutil
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-000006")
    return dest


def test_distributed_checkpoints_hold_no_pickle(runs):
    from pretune.safety import check_safetensors, looks_like_pickle
    from pretune.runs.checkpoint import verify
    for name in ("gpt-ddp", "gpt-fsdp"):
        ck = runs(name) / "checkpoints" / "step-000003"
        assert verify(ck) is None
        assert len(list((ck / "dcp").glob("shard-*.safetensors"))) == 2  # each rank its shard
        for p in (p for p in ck.rglob("*") if p.is_file()):
            assert not looks_like_pickle(p), p
            if p.suffix == ".safetensors":
                check_safetensors(p)
            else:
                json.loads(p.read_text())  # everything else is JSON
        state = json.loads((ck / "state.json").read_text())
        assert state["world_size"] == 2 and len(state["rng"]["torch_cpu"]) == 2
        assert "optimizer" in state and "param_groups" in state["optimizer"]


@pytest.mark.parametrize("saved,nproc,batch,more", [
    ("gpt-ddp", 0, 4, ("--train.global-batch", "8")),   # 2 -> 1: micro 4 x accumulation 2
    ("gpt-fsdp", 0, 8, ()),                             # 2 FSDP2 shards -> 1
    ("gpt-1", 2, 4, ()),                                # 1 -> 2
], ids=["ddp-2to1", "fsdp-2to1", "1to2-ddp"])
def test_a_run_resumes_at_another_world_size_as_the_uninterrupted_run(tmp_path, data, runs, saved, nproc, batch,
                                                                       more):
    run = _at_step_3(runs(saved), tmp_path / "run")
    ok(pretune(command("gpt", data, run, 6, batch, *more), nproc=nproc))
    assert_same_run(runs("gpt-1"), run)


def test_ranks_started_with_different_configs_fail_in_one_line(tmp_path, data):
    """--train.global-batch that micro-batch x world does not divide: one line, exit 2."""
    r = pretune(command("gpt", data, tmp_path / "bad", 2, 3, "--train.global-batch", "8"), nproc=2)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("pretune: error:")]
    assert r.stderr.count("pretune: error:") == 1 and "global-batch 8" in lines[0]  # every rank finds it; rank 0 says it
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory):
    import csv
    path = tmp_path_factory.mktemp("task") / "task.csv"
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(90):
            w.writerow([" ".join(words[(i * j) % 6] for j in range(1 + i % 5)), ["pos", "neg"][i % 2]])
    return path


@pytest.mark.parametrize("family", ["gpt", "bert-moe"], ids=["gpt-dense-L3", "bert-MoE-L3-MLM"])
def test_two_process_finetuning_equals_one_process(tmp_path, data, runs, task_csv, family):
    """Fine-tuning L3 with every dropout off (--finetune.head-dropout 0 too): 2 ranks x 4 equal 1 x 8
    at every step, allclose 1e-5: the loss and each term (L2; L1 on the decoder, its token count
    varying with each rank's padding; MLM on the encoder, its masks drawn per example; the MoE
    balancing loss over the global batch, its coefficient 1 so a per-rank one would show), every
    validation, the test metrics. 17 training examples: each epoch's last global batch has 1
    row, so rank 1 gets a stand-in micro-batch that weighs nothing."""
    if family == "gpt":
        init = runs("gpt-1")
    else:  # a tiny BERT whose one block is a mixture of 4 experts (dropless), one pre-training step
        init = tmp_path / "moe"
        ok(pretune(command("bert", data, init, 1, 8, "--model.n-expert", "4", "--model.aux-loss-coef", "1")))
    ft = ["finetune", "--init", str(init), "--task", str(task_csv), "--finetune.objective", "L3",
          "--finetune.epochs", "2", "--finetune.train-examples", "17", "--finetune.dropout", "0",
          "--finetune.head-dropout", "0", "--train.device", "cpu", "--train.log-every", "1"]
    ok(pretune([*ft, "--out", str(tmp_path / "one"), "--train.batch-size", "8"]))
    ok(pretune([*ft, "--out", str(tmp_path / "two"), "--train.batch-size", "4"], nproc=2))
    rows = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("one", "two")]
    steps = [[r for r in rs if "loss" in r] for rs in rows]
    assert len(steps[0]) == len(steps[1]) == 6  # ceil(17 / 8) = 3 global batches per epoch, at any world size
    terms = ["loss", "l2", "l1", "grad_norm"] if family == "gpt" else ["loss", "l2", "mlm", "moe_aux", "grad_norm"]
    for k in terms:
        torch.testing.assert_close(torch.tensor([r[k] for r in steps[0]]), torch.tensor([r[k] for r in steps[1]]),
                                   rtol=1e-5, atol=1e-5, msg=k)
    vals = [[(r["step"], r["val_loss"], r["val_acc"]) for r in rs if "val_loss" in r] for rs in rows]
    assert [v[0] for v in vals[0]] == [v[0] for v in vals[1]] == [3, 6]
    torch.testing.assert_close(torch.tensor(vals[0])[:, 1:], torch.tensor(vals[1])[:, 1:], rtol=1e-5, atol=1e-5)
    ra, rb = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "two"))
    assert ra["steps"] == rb["steps"] == 6 and ra["test"]["n"] == rb["test"]["n"]
    assert abs(ra["test"]["accuracy"] - rb["test"]["accuracy"]) < 1e-9


def test_kill_9_of_one_rank_restarts_the_group_from_the_last_checkpoint(tmp_path, data, runs):
    """SIGKILL of rank 1 at a seeded random moment (mid-forward of a step after the first
    checkpoint); torchrun --max-restarts 3 restarts both ranks, which resume from the last complete
    checkpoint and finish with the weights of the uninterrupted run."""
    import random
    k = random.Random(15).randint(4, 6)  # rank 1's k-th forward: step 4, 5 or 6 (after the step-3 checkpoint)
    env = {"PRETUNE_FAULT": f"after_forward:{k}", "PRETUNE_FAULT_RANK": "1",
           "PRETUNE_FAULT_ONCE": str(tmp_path / "killed-once")}
    r = ok(pretune(command("gpt", data, tmp_path / "run", 6, 4), nproc=2, extra=("--max-restarts", "3"), env=env))
    assert (tmp_path / "killed-once").exists(), r.stderr[-2000:]  # it did die once
    assert "resuming" in r.stdout
    assert_same_run(runs("gpt-1"), tmp_path / "run")


RANK_EXIT = """import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *a: None)  # torchrun signals this process group; the rank decides
code = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1] + "." + os.environ["RANK"], "w") as f:
    f.write(str(code))
sys.exit(code)
"""


def test_sigterm_to_the_launcher_checkpoints_every_rank_together(tmp_path, data):
    """SIGTERM to torchrun, which forwards it to every rank, at the worst moment: rank 0 has logged
    step 3 and is between steps (PRETUNE_FAULT_PAUSE holds it there) while rank 1 already waits in
    the next collective. The ranks agree on the stop at the step boundary (one all-reduce), write
    the checkpoint together, and each exits 143, as a wrapper around each rank sees; rank 0 says the
    one line; the run resumes. PRETUNE_TEST_SIGTERM_DELAY=s: the signal comes instead s seconds
    after the 3rd logged step, whatever the ranks are doing (scripts/stress_sigterm.sh)."""
    import signal
    import time
    run, wrapper, status = tmp_path / "run", tmp_path / "rank_exit.py", tmp_path / "exit"
    wrapper.write_text(RANK_EXIT)
    args = command("gpt", data, run, 400, 4, "--train.ckpt-every", "1000")
    delay = os.environ.get("PRETUNE_TEST_SIGTERM_DELAY")
    env, marker = _env(), tmp_path / "rank0-between-steps"
    if delay is None:
        env.update(PRETUNE_FAULT="between_steps:3", PRETUNE_FAULT_RANK="0", PRETUNE_FAULT_PAUSE=str(marker))
    cmd = torchrun(2)[:-2] + [str(wrapper), str(status), sys.executable, "-m", "pretune", *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    t0 = time.time()
    if delay is None:
        while time.time() - t0 < 120 and not marker.exists() and p.poll() is None:
            time.sleep(0.01)
    else:
        while time.time() - t0 < 120 and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.01)
        time.sleep(float(delay))
    p.send_signal(signal.SIGTERM)  # torchrun forwards it to each rank's process group
    out, err = p.communicate(timeout=120)
    assert err.count("pretune: stopped by SIGTERM") == 1, err[-3000:]  # only rank 0 talks
    codes = {r: (tmp_path / f"exit.{r}").read_text() for r in (0, 1)}
    assert codes == {0: "143", 1: "143"}, (codes, err[-3000:])  # 128 + SIGTERM on every rank
    from pretune.runs.checkpoint import latest_checkpoint, verify
    ck = latest_checkpoint(run)
    step = int(ck.name.split("-")[1])
    assert 0 < step < 400 and verify(ck) is None
    if delay is None:
        assert step == 3  # the step both ranks had finished when they agreed
    assert len(list((ck / "dcp").glob("shard-*.safetensors"))) == 2  # both ranks wrote, together
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step
    # torchrun's own exit status is its own business (docs/distributed.md); the run resumes
    r = ok(pretune(command("gpt", data, run, step + 1, 4, "--train.ckpt-every", "1000"), nproc=2))
    assert f"resuming {run} from step {step}" in r.stdout


def test_two_agents_rendezvous_on_loopback(tmp_path, data, runs):
    """--nnodes 2 through c10d on 127.0.0.1: two torchrun agents, one rank each, = 2 x 4 = 1 x 8."""
    port, run = _port(), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pretune-test",
           "-m", "pretune", *command("gpt", data, run, 6, 4)]
    agents = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outs = [a.communicate(timeout=240) for a in agents]
    for a, (o, e) in zip(agents, outs):
        assert a.returncode == 0, e[-3000:]
    assert_same_run(runs("gpt-1"), run)


def test_tensorboard_event_files_of_a_two_process_run(runs):
    """--train.log tensorboard: rank 0's event files under RUN/tb/, read back with tensorboard's own
    reader: the loss of every step, as metrics.jsonl has it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = runs("gpt-ddp")
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    want = [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]
    assert [s for s, _ in got] == [s for s, _ in want]
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]))
    assert len(list((run / "tb").iterdir())) == 1  # one writer: rank 0
