"""Checkpoints: verified on load with fallback, crash leftovers ignored and cleaned, disk trouble
leaves the previous checkpoint intact, nothing unsafe is loaded (pickles, absurd safetensors
headers, manifest paths outside the checkpoint)."""

import errno
import json
import os
import pickle
import warnings

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pretune import Transformer
from pretune.config.model import ModelConfig
from pretune.errors import PretuneError
from pretune.models.load import load_model
from pretune.objectives.registry import pretrain_loss
from pretune.runs import checkpoint as ck
from pretune.safety import check_safetensors, looks_like_pickle
from pretune.training.config import TrainConfig
from pretune.training.loop import Trainer


class Tokens:
    """Batch k is a pure function of k (the loader contract of data/loaders.py)."""

    def __init__(self):
        self.k = 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.k)
        self.k += 1
        x = torch.randint(0, 50, (4, 17), generator=g)
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads run ~6x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CFG = ModelConfig(name="t", vocab_size=50, max_seq_len=16, n_layer=1, n_head=2, d_model=32)


def trainer(run, steps=20, eval_fn=None, **kw):
    torch.manual_seed(0)
    tc = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=2, log_every=5, eval_every=kw.pop("eval_every", 0),
                     ckpt_every=5, keep_last=kw.pop("keep_last", 3), seed=1, guard=False, device="cpu")
    return Trainer(Transformer(CFG), tc, Tokens(), pretrain_loss, run, eval_fn=eval_fn, progress=False, **kw)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 20-step run (checkpoints at 5, 10, 15, 20)."""
    run = tmp_path_factory.mktemp("straight")
    trainer(run).fit()
    return run


def damage_and_resume(straight, tmp_path, damage, capsys):
    """Copy the run as it was at step 15, damage step 15, resume to 20: must equal the straight run.
    The broken checkpoint is named in one clean `warning:` line (no Python warning machinery)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step-000020")
    damage(run / "checkpoints" / "step-000015")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would fail the test
        t = trainer(run)
        t.fit()
    err = capsys.readouterr().err.splitlines()
    assert [l for l in err if "unusable" in l] == [l for l in err if l.startswith("warning: checkpoint step-000015 "
                                                                              "is unusable (")]
    assert any("falling back to the previous one" in l for l in err), err
    assert same_weights(weights(run / "checkpoints" / "step-000020"), weights(straight / "checkpoints" / "step-000020"))
    return run


def test_corrupted_latest_falls_back_and_resumes_exactly(straight, tmp_path, capsys):
    def flip(d):
        p = d / "model.safetensors"
        b = bytearray(p.read_bytes())
        b[-5] ^= 0x01  # one bit of one weight
        p.write_bytes(bytes(b))
    run = damage_and_resume(straight, tmp_path, flip, capsys)
    assert (run / "checkpoints" / ".broken-step-000015").is_dir()  # set aside for a post-mortem


def test_truncated_latest_falls_back(straight, tmp_path, capsys):
    def cut(d):
        p = d / "optimizer.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    damage_and_resume(straight, tmp_path, cut, capsys)


def test_missing_manifest_falls_back(straight, tmp_path, capsys):
    damage_and_resume(straight, tmp_path, lambda d: (d / "manifest.json").unlink(), capsys)


def _damaged_run(straight, tmp_path, keep=("step-000020",)):
    """A copy of the straight run with a config.json, keeping only the `keep` checkpoints, each with
    its model.safetensors cut in half."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for p in ck.list_checkpoints(run):
        if p.name not in keep:
            shutil.rmtree(p)
        else:
            f = p / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (run / "config.json").write_text(json.dumps({"model": CFG.to_dict()}))
    return run


def test_a_run_whose_only_checkpoint_is_damaged_says_so_in_clean_lines(straight, tmp_path):
    """`python -m pretune generate` on it: `warning:` lines and one error line naming the count, exit 2."""
    import re
    import subprocess
    import sys
    run = _damaged_run(straight, tmp_path)
    p = subprocess.run([sys.executable, "-m", "pretune", "generate", "hi", "--run", str(run)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2, p.stderr
    assert "UserWarning" not in p.stderr and "warnings.warn" not in p.stderr and ".py:" not in p.stderr
    assert lines[:-1] == ["warning: checkpoint step-000020 is unusable (checksum mismatch in model.safetensors) "
                          f"({run / 'checkpoints'})"], p.stderr
    assert lines[-1].startswith("pretune: error: ") and re.search(r"\b1 checkpoint\b.*damaged", lines[-1]), lines[-1]
    assert "train the run first" not in lines[-1] and "backup" in lines[-1]


def test_all_checkpoints_damaged_is_an_error_for_every_reader(straight, tmp_path, capsys):
    """Two damaged checkpoints: loading the model (generate, embed, export, finetune --init) and
    resuming the training both say so; the training does not quietly start again from step 0."""
    from pretune.cli import main
    run = _damaged_run(straight, tmp_path, keep=("step-000015", "step-000020"))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PretuneError, match=r"2 checkpoints exist, but all are damaged") as e:
            load_model(run)
        assert "step-000015" in str(e.value) and "step-000020" in str(e.value)
        err = capsys.readouterr().err.splitlines()
        assert [l.split(" (")[0] for l in err] == [
            "warning: checkpoint step-000020 is unusable", "warning: checkpoint step-000015 is unusable"], err
        assert "falling back" in err[0] and "falling back" not in err[1]
        metrics = (run / "metrics.jsonl").read_text()
        with pytest.raises(PretuneError, match=r"2 checkpoints exist, but all are damaged"):
            trainer(run).fit()
        assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained from scratch
        task = tmp_path / "task.csv"
        task.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(40)))
        assert main(["finetune", "--init", str(run), "--task", str(task), "--out", str(tmp_path / "ft")]) == 2
        assert "2 checkpoints exist, but all are damaged" in capsys.readouterr().err
    # a run whose damaged checkpoints an earlier resume set aside names them too
    for p in ck.list_checkpoints(run):
        p.rename(p.parent / f".broken-{p.name}")
    with pytest.raises(PretuneError, match=r"2 checkpoints exist, but all are damaged \(2 set aside"):
        load_model(run)


def test_verify_names_each_problem(straight, tmp_path):
    import shutil
    d = tmp_path / "checkpoints" / "step-000010"
    shutil.copytree(straight / "checkpoints" / "step-000010", d)
    assert ck.verify(d) is None
    m = json.loads((d / "manifest.json").read_text())
    for name, problem in [("../../etc/passwd", "outside"), ("/etc/passwd", "outside"), ("gone.json", "missing")]:
        bad = {**m, "files": {**m["files"], name: "0" * 64}}
        (d / "manifest.json").write_text(json.dumps(bad))
        assert problem in ck.verify(d)
    (d / "manifest.json").write_text(json.dumps({**m, "step": 11}))
    assert "step 11" in ck.verify(d)
    (d / "manifest.json").write_text("{not json")
    assert ck.verify(d) == "unreadable manifest"
    # a manifest entry that is a link out of the folder is outside too
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "state.json").unlink()
    (d / "state.json").symlink_to(straight / "checkpoints" / "step-000010" / "state.json")
    assert "outside" in ck.verify(d)


def test_tmp_folder_of_a_crashed_save_is_ignored_then_cleaned(straight, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step-000020")
    # a save of step 20 that died after its weights: a complete-looking folder, without manifest
    partial = run / "checkpoints" / ".tmp-step-000020"
    partial.mkdir()
    shutil.copy(straight / "checkpoints" / "step-000020" / "model.safetensors", partial)
    assert ck.latest_checkpoint(run).name == "step-000015"
    assert partial.exists()  # a reader never deletes: it might be a save in progress
    t = trainer(run, steps=20)
    t.resume()
    assert t.step == 15 and not partial.exists()


def test_resave_of_a_step_keeps_a_good_copy_if_the_rename_fails(straight, tmp_path, monkeypatch):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    t = trainer(run)
    t.resume()
    real = os.replace

    def failing(src, dst):
        if str(src).endswith(".tmp-step-000020"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PretuneError, match="No space left"):
        t.save()
    monkeypatch.undo()
    assert ck.latest_checkpoint(run).name == "step-000020"
    assert same_weights(weights(run / "checkpoints" / "step-000020"), weights(straight / "checkpoints" / "step-000020"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010", "step-000015", "step-000020"]


@pytest.mark.parametrize("fail", ["weights-enospc", "manifest-eacces", "rename-enospc", "metrics-enospc"])
def test_disk_trouble_ends_the_run_cleanly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail):
    """The write of the step-10 checkpoint (or the metrics line of step 10) fails: a PretuneError
    naming the cause, no partial folder, step 5 intact and loadable, and a rerun completes."""
    import pretune.runs.checkpoint as mod
    real_save, real_replace, real_open = mod.save_model, os.replace, open
    calls = {"n": 0}

    def save_model(model, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the real library's error for a full disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(model, path)

    def replace(src, dst):
        if str(dst).endswith("manifest.json") and ".tmp-step-000010" in str(dst):
            raise OSError(errno.EACCES, "Permission denied")
        if str(src).endswith(".tmp-step-000010"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    def open_(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode and calls["n"] >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *a, **k)

    run = tmp_path / "run"
    if fail == "weights-enospc":
        monkeypatch.setattr(mod, "save_model", save_model)
    elif fail == "metrics-enospc":
        monkeypatch.setattr(mod, "save_model", lambda m, p: (calls.__setitem__("n", calls["n"] + 1), real_save(m, p)))
        monkeypatch.setattr("builtins.open", open_)
    else:
        monkeypatch.setattr(os, "replace", replace)
    t = trainer(run)
    with pytest.raises(PretuneError) as e:
        t.fit()
    msg = str(e.value)
    assert "\n" not in msg and ("No space left" in msg or "Permission denied" in msg)
    assert "rerun the same command" in msg
    monkeypatch.undo()
    cks = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cks == ["step-000005"], cks  # no .tmp-* left behind
    assert ck.verify(run / "checkpoints" / "step-000005") is None
    model = Transformer(CFG)
    ck.load_weights(model, run / "checkpoints" / "step-000005")
    t2 = trainer(run)
    t2.fit()
    assert t2.step == 20


def test_keeps_last_k_and_the_best(tmp_path):
    vals = iter([3.0, 1.0, 2.0])  # evaluations at steps 5, 10, 15; the best is step 10

    t = trainer(tmp_path, steps=20, eval_fn=lambda: {"val_loss": next(vals, 2.5)}, eval_every=5, keep_last=1)
    t.fit()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-000010", "step-000020"]


# ---- nothing unsafe is loaded ---------------------------------------------------------------

class Payload:
    """A pickle that, if ever unpickled, creates a file (it could as well run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name,how", [("model.pt", "pickle"), ("pytorch_model.bin", "torch.save"),
                                      ("extra.json", "pickle")])
def test_a_checkpoint_holding_a_pickle_is_refused_without_running_it(straight, tmp_path, name, how):
    import shutil
    from pretune.cli import main
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / "step-000020" / name
    if how == "pickle":
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"x": Payload(marker)}, target)
    assert looks_like_pickle(target)
    with pytest.raises(PretuneError, match=f"{name} is a pickle"):
        ck.latest_checkpoint(run)
    (run / "tokenizer.json").unlink(missing_ok=True)
    assert main(["generate", "hi", "--run", str(run)]) == 2
    assert not marker.exists()
    # our own files are not mistaken for pickles
    for f in (straight / "checkpoints" / "step-000020").iterdir():
        assert not looks_like_pickle(f)


def test_a_checkpoint_linked_from_outside_the_run_is_refused(straight, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-000020").symlink_to(straight / "checkpoints" / "step-000020")
    with pytest.raises(PretuneError, match="links outside"):
        ck.latest_checkpoint(run)


def _safetensors_bytes(header: dict, data: bytes, n=None) -> bytes:
    h = json.dumps(header).encode()
    return (len(h) if n is None else n).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("n,header,data,needle", [
    (2**63 - 1, {}, b"", "header length 9,223,372,036,854,775,807"),  # would be 8 EiB
    (10**9, {}, b"", "cap"),
    (None, {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}, b"\0" * 16, "past the"),
    (None, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "does not fill"),
    (None, {"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
    (None, [1, 2], b"", "not a JSON object"),
    (None, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
])
def test_absurd_safetensors_headers_are_rejected_before_allocating(tmp_path, n, header, data, needle):
    import tracemalloc
    p = tmp_path / "model.safetensors"
    raw = _safetensors_bytes(header, data, n)
    p.write_bytes(raw if n is None or n < 10**9 else raw[:8])
    tracemalloc.start()
    with pytest.raises(PretuneError, match=needle):
        check_safetensors(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # nothing near the claimed size was allocated
    p.write_bytes(b"\x01\x02")
    with pytest.raises(PretuneError, match="shorter than"):
        check_safetensors(p)


def test_load_weights_checks_the_header_first(straight, tmp_path):
    import shutil
    d = tmp_path / "step-000020"
    shutil.copytree(straight / "checkpoints" / "step-000020", d)
    p = d / "model.safetensors"
    p.write_bytes((2**62).to_bytes(8, "little") + p.read_bytes()[8:])
    with pytest.raises(PretuneError, match="not a valid safetensors file"):
        ck.load_weights(Transformer(CFG), d)


# ---- no unpickling anywhere in the source -------------------------------------------------

PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}


def unpickling(source: str) -> list[str]:
    """Every way `source` could unpickle, found in its syntax tree (strings and comments that only
    mention pickle do not count): an import of a pickling module in any form (`import pickle as p`,
    `from pickle import loads`, `importlib.import_module("dill")`, `__import__("shelve")`), a
    `torch.load` (under any alias, or imported by name) without `weights_only=True`, an
    `allow_pickle=` that is not `False` (`numpy.load`), and `Unpickler` / `read_pickle`."""
    import ast
    tree = ast.parse(source)
    torch_names = {"torch"}  # local names bound to the torch module
    found = []

    def where(node, what):
        found.append(f"line {node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLING_MODULES:
                    where(node, f"import {a.name}")
                if a.name == "torch":
                    torch_names.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in PICKLING_MODULES:
                where(node, f"from {mod} import ...")
            if mod.split(".")[0] == "torch" and any(a.name in ("load", "serialization") for a in node.names):
                where(node, f"from {mod} import {', '.join(a.name for a in node.names)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).split(".")[0] in PICKLING_MODULES:
                where(node, f"{name}({node.args[0].value!r})")
            kw = {k.arg: k.value for k in node.keywords}
            if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                             and kw["allow_pickle"].value is False):
                where(node, f"{name}(..., allow_pickle=...)")
        if isinstance(node, ast.Attribute):
            if node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id in torch_names:
                parent = next((c for c in ast.walk(tree) if isinstance(c, ast.Call) and c.func is node), None)
                kw = {k.arg: k.value for k in parent.keywords} if parent else {}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    where(node, f"{node.value.id}.load without weights_only=True")
            if node.attr in ("Unpickler", "read_pickle"):
                where(node, f".{node.attr}")
            if node.attr == "serialization" and isinstance(node.value, ast.Name) and node.value.id in torch_names:
                where(node, f"{node.value.id}.serialization")  # torch's pickle loader lives there
        if isinstance(node, ast.Name) and node.id in ("Unpickler", "read_pickle"):
            where(node, node.id)
    return found


FORBIDDEN = [
    "import pickle", "import pickle as p", "import _pickle", "import dill", "import cloudpickle",
    "import joblib", "import shelve\nshelve.open('db')", "import os, pickle", "from pickle import loads",
    "from pickle import Unpickler as U", "from dill import *", "from joblib import load",
    "from cloudpickle.cloudpickle import loads", "import importlib\nimportlib.import_module('pickle')",
    "__import__('dill')", "import torch\ntorch.load('x.pt')", "import torch\ntorch.load('x.pt', weights_only=False)",
    "import torch as T\nT.load(f)", "import torch\nf = torch.load", "from torch import load",
    "from torch.serialization import load", "import torch\ntorch.serialization.load(f)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)", "import numpy\nnumpy.load(f, allow_pickle=yes)",
    "import pandas as pd\npd.read_pickle('x')", "x.Unpickler(f).load()",
]
ALLOWED = [
    "import torch\ntorch.load('x.pt', weights_only=True)", "import numpy as np\nnp.load('a.npy')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=False)", "s = 'import pickle; pickle.loads(b)'  # pickle",
    "from .safety import looks_like_pickle, refuse_pickles\nlooks_like_pickle(p)", "import json\njson.loads(s)",
    "import safetensors.torch\nsafetensors.torch.load_file(p)",
]


@pytest.mark.parametrize("code", FORBIDDEN)
def test_the_pickle_scan_catches(code):
    assert unpickling(code), code


@pytest.mark.parametrize("code", ALLOWED)
def test_the_pickle_scan_lets_through(code):
    assert unpickling(code) == [], code


def test_no_pickle_in_the_source():
    """No file of the package, its scripts or benchmarks can unpickle (the scan above, on each)."""
    import pathlib
    root = pathlib.Path(ck.__file__).parents[3]
    files = [f for d in ("src", "scripts", "benchmarks") for f in (root / d).rglob("*.py")]
    assert len(files) > 30
    bad = {str(f.relative_to(root)): u for f in files if (u := unpickling(f.read_text()))}
    assert bad == {}
