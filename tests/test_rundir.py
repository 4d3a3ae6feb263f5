"""The run directory (runs/layout.py), the one model resolver (runs/resolve.py), self-contained
checkpoints and the atomic writes (fileio.atomic_file / atomic_dir / cache_root)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretune import fileio
from pretune.cli import main
from pretune.config.presets import PRESETS
from pretune.errors import PretuneError
from pretune.runs.layout import RunDir
from pretune.runs.resolve import resolve_model_config

TEXT = "\n\n".join(f"Document {i}. The quick brown fox jumps over the lazy dog, and the clocks were striking "
                   f"{i % 13}. Call me Ishmael." for i in range(60))
TINY = ["--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2", "--model.max-seq-len", "32",
        "--model.vocab-size", "320"]
TRAIN = ["--train.batch-size", "2", "--train.seq-len", "32", "--train.eval-batches", "1",
         "--train.log-every", "1", "--train.device", "cpu", "--train.warmup", "100"]
TINY_MODEL = {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 32, "vocab_size": 320}


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A prepared corpus, a 2-step GPT run on it and a 1-epoch fine-tuning of that run."""
    from pretune.tokenizer.vocabularies import train_tokenizer
    d = tmp_path_factory.mktemp("rundir")
    (d / "corpus.txt").write_text(TEXT)
    train_tokenizer("bpe", 320, TEXT.split("\n\n")).save(d / "bpe.json")
    assert main(["prepare", "--corpus", str(d / "corpus.txt"), "--tokenizer", str(d / "bpe.json"),
                 "--out", str(d / "data"), "--val-fraction", "0.2"]) == 0
    assert main(["pretrain", "--model", "gpt-mini", "--data", str(d / "data"), "--out", str(d / "gpt"),
                 "--train.steps", "2", *TINY, *TRAIN]) == 0
    rows = [f"the film was {'good' if i % 2 else 'bad'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(60)]
    (d / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    assert main(["finetune", "--init", str(d / "gpt"), "--task", str(d / "task.csv"), "--finetune.epochs", "1",
                 "--train.batch-size", "16", "--out", str(d / "ft")]) == 0
    return d


# ---- atomic writes ---------------------------------------------------------------------

def test_an_exception_inside_atomic_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with fileio.atomic_file(tmp_path / "a.txt") as f:
            f.write("half")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "b.txt").write_text("old")
    with pytest.raises(KeyError):
        with fileio.atomic_file(tmp_path / "b.txt", "wb") as f:
            f.write(b"new")
            raise KeyError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"] and (tmp_path / "b.txt").read_text() == "old"


def test_a_reader_never_sees_half_a_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("old")
    with fileio.atomic_file(p) as f:
        f.write("new, first half")
        f.flush()
        assert p.read_text() == "old"  # mid-write the reader still sees the whole old file
        f.write(" and the second")
    assert p.read_text() == "new, first half and the second"
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_swaps_the_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(out) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with fileio.atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()
    with fileio.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        assert [p.name for p in out.iterdir()] == ["a"]  # the old one stays whole until the swap
    assert [p.name for p in out.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_one_cache_root_is_read_at_call_time(tmp_path, monkeypatch):
    from pretune.data.tokenizers import cache_dir
    from pretune.hardware.peak import cache_file
    monkeypatch.setenv("PRETUNE_CACHE", str(tmp_path / "c"))
    assert fileio.cache_root() == tmp_path / "c" == cache_dir() and cache_file() == tmp_path / "c" / "peak.json"
    monkeypatch.delenv("PRETUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fileio.cache_root() == tmp_path / "home" / ".cache" / "pretune" == cache_dir()
    assert cache_file() == tmp_path / "home" / ".cache" / "pretune" / "peak.json"


# ---- the resolver ------------------------------------------------------------------------

def test_each_kind_of_spec_resolves(w, tmp_path):
    c = resolve_model_config("gpt-mini")
    assert (c.name, c.n_layer, c.d_model) == ("gpt-mini", PRESETS["gpt-mini"]["n_layer"], PRESETS["gpt-mini"]["d_model"])
    assert resolve_model_config("gpt-mini", {"n_layer": 3}).n_layer == 3
    (tmp_path / "m.json").write_text(json.dumps({"model": {**TINY_MODEL, "causal": True}}))
    (tmp_path / "m.yaml").write_text("n_layer: 2\nd_model: 48\nn_head: 4\n")
    m = resolve_model_config(tmp_path / "m.json")
    assert (m.name, m.n_layer, m.d_model, m.vocab_size) == ("m", 1, 32, 320)
    y = resolve_model_config(str(tmp_path / "m.yaml"))
    assert (y.name, y.n_layer, y.d_model, y.n_head) == ("m", 2, 48, 4)
    r = resolve_model_config(w / "gpt")
    assert {k: getattr(r, k) for k in TINY_MODEL} == TINY_MODEL and r.causal
    # a fine-tuned run's body, and one checkpoint folder of a run, resolve to the same shape
    assert {k: getattr(resolve_model_config(w / "ft"), k) for k in TINY_MODEL} == TINY_MODEL
    ck = sorted((w / "gpt" / "checkpoints").glob("step-*"))[-1]
    assert resolve_model_config(ck) == r


def test_an_unknown_spec_is_one_line_naming_near_presets(capsys):
    with pytest.raises(PretuneError) as e:
        resolve_model_config("gpt-mnii")
    assert "gpt-mini" in str(e.value) and "\n" not in str(e.value)
    assert main(["cost", "gpt-mnii"]) == 2
    err = capsys.readouterr().err
    assert "did you mean gpt-mini" in err and err.count("\n") == 1


def test_pretrain_and_cost_take_a_run_directory(w, tmp_path, capsys):
    """`pretune pretrain --model RUN` (refused as an unknown preset before) builds the run's model."""
    out = tmp_path / "again"
    assert main(["pretrain", "--model", str(w / "gpt"), "--data", str(w / "data"), "--out", str(out),
                 "--train.steps", "1", *TRAIN]) == 0
    m = json.loads((out / "run.json").read_text())["model"]
    assert {k: m[k] for k in TINY_MODEL} == TINY_MODEL
    capsys.readouterr()
    assert main(["cost", str(w / "gpt")]) == 0
    assert "gpt-mini" in capsys.readouterr().out


# ---- the run directory --------------------------------------------------------------------

def test_run_json_is_versioned_and_its_kind_known(w):
    d = json.loads((w / "gpt" / "run.json").read_text())
    assert (d["format"], d["version"]) == ("pretune-run", 2) and not (w / "gpt" / "config.json").exists()
    assert RunDir(w / "gpt").kind == "pretrained" and RunDir(w / "ft").kind == "fine-tuned"
    assert d["data"] == "../data"  # relative to the run: w/data next to w/gpt
    ft = json.loads((w / "ft" / "run.json").read_text())
    assert ft["finetune"]["init"] == "../gpt" and ft["task"]["source"] == "../task.csv"


def test_metrics_are_read_up_to_the_last_complete_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n{"step": 3, "lo')
    assert RunDir(tmp_path).metrics() == [{"step": 1}, {"step": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}')  # the last one never got its newline
    assert RunDir(tmp_path).metrics() == [{"step": 1}]


def test_a_newer_version_is_refused_in_one_line(w, tmp_path, capsys):
    run = shutil.copytree(w / "gpt", tmp_path / "run")
    d = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**d, "version": 3}))
    assert main(["generate", "hi", "--run", str(run), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "format version 3; this pretune reads version 2" in err and err.count("\n") == 1


def test_a_hugging_face_folder_given_as_a_run_says_import_it(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1}))
    for argv in (["generate", "hi", "--run", str(hf)], ["pretrain", "--model", str(hf)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"pretune import hf:{hf}" in err and err.count("\n") == 1, err


def _old_format(run: Path) -> None:
    """Make a run look as pretune wrote it before version 2: config.json with no format key, the data
    path as given (absolute here), checkpoints without model.json and tokenizer.json."""
    d = json.loads((run / "run.json").read_text())
    d = {k: v for k, v in d.items() if k not in ("format", "version")}
    d["data"] = str((run / d["data"]).resolve())
    (run / "config.json").write_text(json.dumps(d))
    (run / "run.json").unlink()
    for ck in (run / "checkpoints").glob("step-*"):
        (ck / "model.json").unlink()
        (ck / "tokenizer.json").unlink()
        mf = json.loads((ck / "manifest.json").read_text())
        mf["files"] = {k: v for k, v in mf["files"].items() if k not in ("model.json", "tokenizer.json")}
        (ck / "manifest.json").write_text(json.dumps(mf))


def test_an_old_format_run_still_loads_and_resumes(w, tmp_path, capsys):
    from pretune.models.load import load_model
    run = shutil.copytree(w / "gpt", tmp_path / "old")
    _old_format(run)
    model, cfg, tok = load_model(run)
    assert {k: getattr(cfg, k) for k in TINY_MODEL} == TINY_MODEL and tok is not None
    ck = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert resolve_model_config(ck) == cfg  # an old checkpoint falls back to its run's file
    capsys.readouterr()
    assert main(["pretrain", "--model", "gpt-mini", "--data", str(w / "data"), "--out", str(run),
                 "--train.steps", "3", *TINY, *TRAIN]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["version"] == 2 and not (run / "config.json").exists()
    assert (run / "checkpoints" / "step-000003" / "model.json").is_file()


# ---- self-contained, movable --------------------------------------------------------------

def test_a_copied_checkpoint_folder_alone_loads(w, tmp_path, capsys):
    from pretune.models.load import load_classifier, load_model
    src = sorted((w / "gpt" / "checkpoints").glob("step-*"))[-1]
    alone = shutil.copytree(src, tmp_path / "somewhere" / "ck")
    mf = json.loads((alone / "manifest.json").read_text())["files"]
    assert {"model.json", "tokenizer.json"} <= set(mf)
    model, cfg, tok = load_model(alone)
    saved = load_file(str(src / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k in saved)
    from pretune.tokenizer.core import Tokenizer
    assert tok._tok.get_vocab() == Tokenizer.load(w / "bpe.json")._tok.get_vocab()  # the data's tokenizer
    assert main(["generate", "The", "--run", str(alone), "--max-new-tokens", "2"]) == 0
    ft_ck = sorted((w / "ft" / "checkpoints").glob("step-*"))[-1]
    clf, _, _, info = load_classifier(shutil.copytree(ft_ck, tmp_path / "ftck"))
    assert info["labels"] == ["neg", "pos"] and clf.head.pool == "last"


def test_no_file_under_a_run_holds_an_absolute_path(w):
    base = str(w)
    for run in ("gpt", "ft"):
        for p in (w / run).rglob("*"):
            if p.is_file():
                assert base.encode() not in p.read_bytes(), p


def test_a_moved_run_still_resumes_and_loads(w, tmp_path, capsys):
    """A run made next to its data, then the two moved together (renamed: the old place is gone):
    it loads, resumes, and `evaluate` finds its data from where it now lies."""
    from pretune.models.load import load_model
    a = tmp_path / "a"
    a.mkdir()
    shutil.copytree(w / "data", a / "data")
    assert main(["pretrain", "--model", "gpt-mini", "--data", str(a / "data"), "--out", str(a / "gpt"),
                 "--train.steps", "2", *TINY, *TRAIN]) == 0
    moved = tmp_path / "b"
    os.rename(a, moved)
    _, cfg, _ = load_model(moved / "gpt")
    assert cfg.n_layer == 1
    capsys.readouterr()
    assert main(["evaluate", "--run", str(moved / "gpt"), "--json-out"]) == 0  # its data found from the run
    assert str(moved / "data") in capsys.readouterr().out
    assert main(["pretrain", "--model", "gpt-mini", "--data", str(moved / "data"), "--out", str(moved / "gpt"),
                 "--train.steps", "3", *TINY, *TRAIN]) == 0
    assert "resuming" in capsys.readouterr().out


def test_a_moved_finetuned_run_resumes_and_another_init_is_refused(w, tmp_path, capsys):
    """The init is compared by its weights' SHA-256 (the path is relative to another folder once
    the run moved): the same init resumes the moved run, other weights are refused."""
    ft = ["--task", str(w / "task.csv"), "--finetune.epochs", "1", "--train.batch-size", "16"]
    run = shutil.copytree(w / "ft", tmp_path / "moved" / "ft")
    capsys.readouterr()
    assert main(["finetune", "--init", str(w / "gpt"), *ft, "--out", str(run)]) == 0
    other = shutil.copytree(w / "gpt", tmp_path / "other")
    assert main(["pretrain", "--model", "gpt-mini", "--data", str(w / "data"), "--out", str(other),
                 "--train.steps", "3", *TINY, *TRAIN]) == 0
    capsys.readouterr()
    assert main(["finetune", "--init", str(other), *ft, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "the run was started with init=" in err and err.count("\n") == 1, err
