"""The bad-input sweep: malformed configs, corpora, tasks, checkpoints and option values across
every command. Each must end with one line on stderr starting `pretune: error:`, exit status 2,
no traceback, and no file left behind that was not there before. The list is in docs/errors.md.

Most cases call `pretune.cli.main` in this process (a traceback would fail the test); a few
run `python -m pretune` as a subprocess to check the real stderr and exit status."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretune.cli import main
from pretune.cli.verbs import VERBS

TEXT = "\n\n".join(f"Document {i}. The quick brown fox jumps over the lazy dog, and the clocks were striking "
                   f"{i % 13}. Call me Ishmael. Some years ago, never mind how long." for i in range(80))
AUSTEN_STATES = ("austen-present", "austen-hidden")  # the `austen_state` fixture's states (conftest.py)
TINY = ["--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2", "--model.max-seq-len", "32",
        "--model.vocab-size", "320"]
TRAIN = ["--train.steps", "2", "--train.batch-size", "2", "--train.seq-len", "32", "--train.eval-batches", "1",
         "--train.log-every", "1", "--train.device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A workspace: a corpus, prepared data (BPE and WordPiece), a GPT run and a BERT run."""
    from pretune.tokenizer.vocabularies import train_tokenizer
    d = tmp_path_factory.mktemp("bad")
    (d / "corpus.txt").write_text(TEXT)
    for kind in ("bpe", "wordpiece"):
        train_tokenizer(kind, 320, TEXT.split("\n\n")).save(d / f"{kind}.json")
        assert main(["prepare", "--corpus", str(d / "corpus.txt"), "--tokenizer", str(d / f"{kind}.json"),
                     "--out", str(d / f"data-{kind}"), "--val-fraction", "0.2"]) == 0
    assert main(["pretrain", "--model", "gpt-mini", "--data", str(d / "data-bpe"), "--out", str(d / "gpt"),
                 *TINY, *TRAIN]) == 0
    assert main(["pretrain", "--model", "bert-mini", "--data", str(d / "data-wordpiece"), "--out", str(d / "bert"),
                 *TINY, *TRAIN]) == 0
    rows = [f"the film was {'good' if i % 2 else 'bad'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(60)]
    (d / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    assert main(["finetune", "--init", str(d / "gpt"), "--task", str(d / "task.csv"), "--finetune.epochs", "1",
                 "--train.batch-size", "16", "--out", str(d / "ft")]) == 0
    assert main(["export", str(d / "gpt"), "--out", str(d / "hf")]) == 0
    return d


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _ck(run):
    return sorted((run / "checkpoints").glob("step-*"))[-1]


# Each case: (id, setup(w, tmp) -> argv, a fragment of the message). `tmp` is an empty folder
# for the case's own malformed files and outputs; the sweep lists it before and after.
def _file(tmp, name, content):
    p = tmp / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _q4_gguf(tmp, matrices):
    """A tiny Llama GGUF, its block matrices Q4_1 or F32 (tests/test_gguf_int4_cli.py)."""
    from test_gguf_int4_cli import write_q4_1_gguf
    return write_q4_1_gguf(tmp / f"tiny-{matrices}.gguf", matrices)


def _int4_run(tmp):
    assert main(["import", f"gguf:{_q4_gguf(tmp, 'Q4_1')}", "--weights", "int4", "--out", str(tmp / "int4")]) == 0
    return tmp / "int4"


def _gpt(w, tmp, *extra):
    return ["pretrain", "--model", "gpt-mini", "--data", str(w / "data-bpe"), "--out", str(tmp / "run"), *TINY,
            *TRAIN, *extra]


def _truncated_shard(w, tmp):
    d = _copy(w / "data-bpe", tmp / "data")
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:100])
    return ["pretrain", "--model", "gpt-mini", "--data", str(d), "--out", str(tmp / "run"), *TINY, *TRAIN]


def _bad_meta(w, tmp):
    d = _copy(w / "data-bpe", tmp / "data")
    (d / "meta.json").write_text('{"format": ')
    return ["pretrain", "--model", "gpt-mini", "--data", str(d), "--out", str(tmp / "run"), *TINY, *TRAIN]


def _changed_model(w, tmp):
    run = _copy(w / "gpt", tmp / "run")
    return ["pretrain", "--model", "gpt-mini", "--data", str(w / "data-bpe"), "--out", str(run), *TINY[:-6],
            "--model.max-seq-len", "32", "--model.vocab-size", "320", "--model.d-model", "64", *TRAIN]


def _pickle_in_checkpoint(w, tmp):
    import pickle
    run = _copy(w / "gpt", tmp / "run")
    (_ck(run) / "model.pt").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    return ["generate", "hello", "--run", str(run)]


def _absurd_header(w, tmp):
    """A checkpoint whose model.safetensors claims an 8 EiB header, with a manifest that matches."""
    import hashlib
    run = _copy(w / "gpt", tmp / "run")
    ck = _ck(run)
    p = ck / "model.safetensors"
    p.write_bytes((2**63 - 1).to_bytes(8, "little") + p.read_bytes()[8:])
    m = json.loads((ck / "manifest.json").read_text())
    m["files"]["model.safetensors"] = hashlib.sha256(p.read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(m))
    return ["generate", "hello", "--run", str(run)]


def _no_checkpoint(w, tmp):
    run = tmp / "run"
    run.mkdir()
    (run / "run.json").write_text((w / "gpt" / "run.json").read_text())
    return ["generate", "hello", "--run", str(run)]


def _bad_run_config(w, tmp):
    run = _copy(w / "gpt", tmp / "run")
    (run / "run.json").write_text("{oops")
    return ["generate", "hello", "--run", str(run)]


def _ft(w, tmp, *extra, task=None):
    return ["finetune", "--init", str(w / "gpt"), "--task", str(task or w / "task.csv"), "--finetune.epochs", "1",
            "--out", str(tmp / "ft"), *extra]


def _adapter_on_another_base(w, tmp):
    """A LoRA adapter fine-tuned on the GPT run, given to the BERT run."""
    assert main(_ft(w, tmp, "--finetune.adapter", "lora", "--train.batch-size", "16")) == 0
    return ["finetune", "--init", str(w / "bert"), "--task", str(w / "task.csv"), "--finetune.adapter",
            str(tmp / "ft" / "adapter.safetensors"), "--out", str(tmp / "ft2")]


def _unseen_test_label(w, tmp):
    rows = [f"the film was {'good' if i % 2 else 'bad'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    val = _file(tmp, "val.csv", "text,label\n" + "\n".join(rows[:10]) + "\n")
    test = _file(tmp, "test.csv", "text,label\n" + "\n".join(rows[10:]) + "\nso so,meh\n")
    return _ft(w, tmp, "--val", str(val), "--test", str(test))


def _only_pickle_hf(w, tmp):
    d = tmp / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2,
                                               "vocab_size": 320, "n_positions": 32}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return ["import", f"hf:{d}", "--out", str(tmp / "run")]


def _under_a_file(w, tmp, verb):
    """`verb` with its output under an existing file: a path that cannot be created."""
    bad = str(_file(tmp, "notes.txt", "a file, not a folder") / "sub" / "out")
    return {
        "prepare": ["prepare", "--corpus", str(w / "corpus.txt"), "--tokenizer", str(w / "bpe.json"), "--out", bad],
        "curate": ["curate", str(w / "corpus.txt"), "--out", bad + ".jsonl"],
        "pretrain": ["pretrain", "--model", "gpt-mini", "--data", str(w / "data-bpe"), "--out", bad, *TINY, *TRAIN],
        "finetune": ["finetune", "--init", str(w / "gpt"), "--task", str(w / "task.csv"), "--finetune.epochs", "1", "--out", bad],
        "import": ["import", f"hf:{w / 'hf'}", "--out", bad],
        "export": ["export", str(w / "gpt"), "--out", bad],
        "demo": ["demo", "--gpt-steps", "1", "--bert-steps", "1", "--out", bad],
        "embed": ["embed", "hello", "--run", str(w / "bert"), "--out", bad + ".npy"],
    }[verb]


WRITERS = ("prepare", "curate", "pretrain", "finetune", "import", "export", "demo", "embed")

CASES = [
    # -- the command line and config files
    ("unknown-verb", lambda w, t: ["pretrian"], "did you mean pretrain"),
    ("unknown-option", lambda w, t: ["cost", "gpt2", "--frobnicate", "8"], "unrecognized arguments"),
    ("option-type", lambda w, t: _gpt(w, t, "--train.steps", "many"), "expects int"),
    ("yaml-syntax", lambda w, t: ["pretrain", "--config", str(_file(t, "c.yaml", "train: [steps: 2"))],
     "not valid YAML"),
    ("yaml-not-mapping", lambda w, t: ["pretrain", "--config", str(_file(t, "c.yaml", "- 1\n- 2\n"))],
     "must hold a mapping"),
    ("yaml-unknown-key", lambda w, t: ["pretrain", "--config", str(_file(t, "c.yaml", "train:\n  stepz: 2\n"))],
     "did you mean 'train.steps'"),
    ("yaml-missing", lambda w, t: ["pretrain", "--config", str(t / "nope.yaml")], "cannot read config file"),
    # -- data parallelism (docs/distributed.md)
    ("parallel-unknown", lambda w, t: _gpt(w, t, "--train.parallel", "zero3"), "parallel='zero3' is unknown"),
    ("global-batch-indivisible", lambda w, t: _gpt(w, t, "--train.global-batch", "3"),
     "is not a multiple of the micro-batch x world size"),
    ("log-unknown", lambda w, t: _gpt(w, t, "--train.log", "wandb"), "log='wandb' is unknown"),
    # -- prepare: corpora and tokenizers
    ("corpus-missing", lambda w, t: ["prepare", "--corpus", str(t / "nope.txt"), "--tokenizer", str(w / "bpe.json"),
                                     "--out", str(t / "data")], "nope.txt"),
    ("corpus-empty", lambda w, t: ["prepare", "--corpus", str(_file(t, "empty.txt", "\n\n  \n")), "--tokenizer",
                                   str(w / "bpe.json"), "--out", str(t / "data")], "no text"),
    ("corpus-bad-jsonl", lambda w, t: ["prepare", "--corpus", str(_file(t, "c.jsonl", '{"text": "a"}\n{oops\n')),
                                       "--tokenizer", str(w / "bpe.json"), "--out", str(t / "data")], "c.jsonl"),
    ("val-fraction", lambda w, t: ["prepare", "--corpus", str(w / "corpus.txt"), "--tokenizer", str(w / "bpe.json"),
                                   "--val-fraction", "1.5", "--out", str(t / "data")], "val_fraction"),
    ("curate-step", lambda w, t: ["prepare", "--corpus", str(w / "corpus.txt"), "--tokenizer", str(w / "bpe.json"),
                                  "--curate", "dedupe", "--out", str(t / "data")], "unknown curation step"),
    ("curate-task", lambda w, t: ["curate", str(w / "corpus.txt"), "--decontaminate", "glue-sst",
                                  "--out", str(t / "kept.jsonl")], "unknown task 'glue-sst'"),
    ("tokenizer-size", lambda w, t: ["prepare", "--tokenizer", "bpe-5", "--out", str(t / "data")], "out of range"),
    ("tokenizer-name", lambda w, t: ["prepare", "--tokenizer", "gtp2", "--out", str(t / "data")],
     "did you mean gpt2"),
    ("tokenizer-json", lambda w, t: ["prepare", "--corpus", str(w / "corpus.txt"), "--tokenizer",
                                     str(_file(t, "tok.json", '{"model": 1')), "--out", str(t / "data")],
     "cannot read the tokenizer"),
    ("prepare-out-clobber", lambda w, t: ["prepare", "--corpus", str(w / "corpus.txt"), "--tokenizer",
                                          str(w / "bpe.json"), "--out", str(_file(t, "precious.txt", "keep"))],
     "not a folder made by `pretune prepare`"),
    ("weights-syntax", lambda w, t: ["prepare", "--corpus", str(w / "corpus.txt"), "--tokenizer", str(w / "bpe.json"),
                                     "--weights", "corpus", "--out", str(t / "data")], "not name=epochs"),
    ("corpus-binary", lambda w, t: ["prepare", "--corpus", str(_file(t, "model.txt", b"GGUF\x03\x00\x00\x00" * 64)),
                                    "--tokenizer", str(w / "bpe.json"), "--out", str(t / "data")],
     "not UTF-8 text (a NUL byte, so a binary file at byte 5)"),
    ("corpus-latin1", lambda w, t: ["prepare", "--corpus", str(_file(t, "c.txt", "Caf\u00e9 cr\u00e8me.\n".encode("latin-1"))),
                                    "--tokenizer", str(w / "bpe.json"), "--out", str(t / "data")],
     "not UTF-8 text (invalid continuation byte at byte 3)"),
    ("austen-not-installed", lambda w, t: ["prepare", "--corpus", "austen,builtin", "--tokenizer", str(w / "bpe.json"),
                                           "--out", str(t / "data")],
     "the built-in source 'austen' is not installed (hidden by PRETUNE_HIDE_SOURCES): apt-get install r-cran-janeaustenr"),
    # -- pretrain: data, model and training options
    ("data-not-prepared", lambda w, t: ["pretrain", "--data", str(t), "--out", str(t / "run"), *TINY, *TRAIN],
     "folder made by pretune"),
    ("data-truncated", _truncated_shard, "does not match meta.json"),
    ("data-meta-json", _bad_meta, "meta.json"),
    ("model-unknown", lambda w, t: ["pretrain", "--model", "gpt-mni"], "did you mean gpt-mini"),
    ("model-json", lambda w, t: ["pretrain", "--model", str(_file(t, "m.json", "{bad")), "--out", str(t / "run")],
     "m.json"),
    ("heads-divide", lambda w, t: _gpt(w, t, "--model.n-head", "3"), "divisible"),
    ("lr-negative", lambda w, t: _gpt(w, t, "--train.lr", "-1"), "lr=-1"),
    ("precision", lambda w, t: _gpt(w, t, "--train.precision", "fp8"), "precision"),
    ("guard-factor", lambda w, t: _gpt(w, t, "--train.guard-factor", "0.5"), "guard_factor"),
    ("seq-len-window", lambda w, t: _gpt(w, t, "--train.seq-len", "64"), "exceeds the model's window"),
    ("vocab-too-small", lambda w, t: _gpt(w, t, "--model.vocab-size", "100"), "tokenizer has 320 tokens"),
    ("device-cuda", lambda w, t: _gpt(w, t, "--train.device", "cuda"), "no CUDA device"),
    ("resume-changed-model", _changed_model, "the run was started with d_model=32"),
    # -- checkpoints and run directories
    ("checkpoint-pickle", _pickle_in_checkpoint, "model.pt is a pickle"),
    ("checkpoint-header", _absurd_header, "header length 9,223,372,036,854,775,807"),
    ("run-no-checkpoint", _no_checkpoint, "no usable checkpoint"),
    ("run-config-json", _bad_run_config, "run.json is not valid JSON"),
    ("run-missing", lambda w, t: ["generate", "hi", "--run", str(t / "nope")], "not a run directory"),
    # -- using a model
    ("generate-encoder", lambda w, t: ["generate", "hi", "--run", str(w / "bert")], "encoder"),
    ("generate-window", lambda w, t: ["generate", "fox " * 200, "--run", str(w / "gpt")], "window"),
    ("generate-empty", lambda w, t: ["generate", "", "--run", str(w / "gpt")], "empty"),
    ("generate-temperature", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--temperature", "-0.5"],
     "--temperature -0.5 is negative"),
    ("generate-temperature-nan", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--temperature", "nan"],
     "--temperature nan is not a number"),
    ("generate-top-p-above-1", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--top-p", "1.5"],
     "--top-p 1.5 is outside (0, 1]"),
    ("generate-top-p-zero", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--top-p", "0"],
     "--top-p 0.0 is outside (0, 1]"),
    ("generate-top-k", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--top-k", "-2"],
     "--top-k -2 is negative"),
    ("generate-max-new-tokens", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--max-new-tokens", "-3"],
     "--max-new-tokens -3 must be at least 1"),
    ("generate-num-samples", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--num-samples", "0"],
     "--num-samples 0 must be at least 1"),
    ("bench-from-json-no-docs", lambda w, t: ["bench", "--from-json", str(t / "b.json")],
     "--from-json only regenerates a table"),
    ("weights-unknown", lambda w, t: ["generate", "hi", "--run", str(w / "gpt"), "--weights", "int9"],
     "unknown --weights 'int9' (did you mean 'int8'?)"),
    ("fill-mask-top-k", lambda w, t: ["fill-mask", "a [MASK] b", "--run", str(w / "bert"), "--top-k", "0"],
     "--top-k 0 must be at least 1"),
    ("fill-mask-top-k-vocab", lambda w, t: ["fill-mask", "a [MASK] b", "--run", str(w / "bert"), "--top-k", "999"],
     "--top-k 999 is more than the 320 tokens"),
    ("fill-mask-no-mask", lambda w, t: ["fill-mask", "no mask here", "--run", str(w / "bert")], "no [MASK]"),
    ("fill-mask-decoder", lambda w, t: ["fill-mask", "a [MASK] b", "--run", str(w / "gpt")], "encoder"),
    ("embed-pooling", lambda w, t: ["embed", "hello", "--run", str(w / "bert"), "--pooling", "max"],
     "unknown pooling"),
    ("embed-texts-file", lambda w, t: ["embed", f"@{t / 'nope.txt'}", "--run", str(w / "bert")],
     "cannot read the texts file"),
    # -- fine-tuning: tasks, options, fine-tuned runs
    ("task-missing", lambda w, t: _ft(w, t, task=t / "nope.csv"), "no such file"),
    ("task-unknown", lambda w, t: _ft(w, t, task="movie-sentimnt"), "did you mean movie-sentiment"),
    ("task-no-label-column", lambda w, t: _ft(w, t, task=_file(t, "t.csv", "text,y\na,1\nb,0\n")),
     "no label column 'label'"),
    ("task-empty-text", lambda w, t: _ft(w, t, task=_file(t, "t.csv", "text,label\na,1\n ,0\n")),
     "row 2 has an empty text"),
    ("task-not-utf8", lambda w, t: _ft(w, t, task=_file(t, "t.csv", b"text,label\n\xff\xfe bad,1\n")),
     "not UTF-8"),
    ("task-too-small", lambda w, t: _ft(w, t, task=_file(t, "t.csv", "text,label\na,x\nb,y\nc,x\n")), "small"),
    ("task-bad-jsonl", lambda w, t: _ft(w, t, task=_file(t, "t.jsonl", '{"text": "a", "label": 1}\n[1]\n')),
     "line 2 is not a JSON object"),
    ("task-jsonl-label-object", lambda w, t: _ft(w, t, task=_file(t, "t.jsonl", '{"text": "a", "label": 1}\n\n'
                                                                               '{"text": "b", "label": {"y": 1}}\n')),
     "line 3 has an object as its label in column 'label'"),
    ("finetune-objective", lambda w, t: _ft(w, t, "--finetune.objective", "L4"), "unknown objective 'L4'"),
    ("finetune-init", lambda w, t: _ft(w, t, "--init", str(t / "nope")), "neither a run directory nor a preset"),
    ("finetune-lam", lambda w, t: _ft(w, t, "--finetune.lam", "-1"), "negative"),
    ("finetune-head-dropout", lambda w, t: _ft(w, t, "--finetune.head-dropout", "1.5"), "not in [0, 1)"),
    ("finetune-freeze", lambda w, t: _ft(w, t, "--finetune.freeze", "everything"), "--finetune.freeze"),
    ("classify-pretrained-run", lambda w, t: ["classify", "nice", "--run", str(w / "gpt")], "not a fine-tuned run"),
    ("classify-texts-file", lambda w, t: ["classify", f"@{t / 'nope.txt'}", "--run", str(w / "ft")], "cannot read the texts file"),
    ("evaluate-split", lambda w, t: ["evaluate", "--run", str(w / "ft"), "--split", "dev"], "unknown split 'dev'"),
    ("evaluate-unseen-label", lambda w, t: ["evaluate", "--run", str(w / "ft"), "--task",
                                            str(_file(t, "e.csv", "text,label\ngood,pos\nso so,meh\n"))],
     "label 'meh' was not seen in training"),
    # -- evaluation without labels (evaluate --tasks, docs/evaluation.md)
    ("eval-task-no-gold", lambda w, t: ["evaluate", "--run", str(w / "gpt"), "--tasks", "mc:" + str(_file(
        t, "mc.jsonl", '{"context": "a", "choices": ["b", "c"], "gold": 0}\n{"context": "a", "choices": ["b", "c"]}\n'))],
     "the example has no 'gold'"),
    ("eval-gold-outside", lambda w, t: ["evaluate", "--run", str(w / "gpt"), "--tasks", "mc:" + str(_file(
        t, "mc.jsonl", '{"context": "a", "choices": ["b", "c"], "gold": 2}\n'))], "the gold 2 is outside the 2 choices"),
    ("eval-template-no-text", lambda w, t: ["evaluate", "--run", str(w / "gpt"), "--tasks", f"prompt:{w / 'task.csv'}",
                                            "--tasks.template", str(_file(t, "tpl.json", '{"prompt": "Review:"}'))],
     "the template has no {text} placeholder"),
    ("eval-too-many-shots", lambda w, t: ["evaluate", "--run", str(w / "gpt"), "--tasks", f"prompt:{w / 'task.csv'}",
                                          "--tasks.shots", "1000"], "the training split holds"),
    ("eval-context-too-long", lambda w, t: ["evaluate", "--run", str(w / "gpt"), "--tasks", "mc:" + str(_file(
        t, "mc.jsonl", json.dumps({"context": "the quick brown fox " * 20, "choices": ["b", "c"], "gold": 0}) + "\n"))],
     "more than the model's window of 32"),
    ("eval-encoder-perplexity", lambda w, t: ["evaluate", "--run", str(w / "bert"), "--tasks", f"perplexity:{w / 'corpus.txt'}"],
     "needs a decoder"),
    ("eval-unknown-task", lambda w, t: ["evaluate", "--run", str(w / "gpt"), "--tasks", "lambada-openai"], "unknown task"),
    # -- LoRA, label kinds, the user's own splits (issue 17)
    ("lora-rank-zero", lambda w, t: _ft(w, t, "--finetune.adapter", "lora", "--finetune.lora-rank", "0"),
     "--finetune.lora-rank 0 must be a positive integer"),
    ("lora-rank-wide", lambda w, t: _ft(w, t, "--finetune.adapter", "lora", "--finetune.lora-rank", "64"),
     "LoRA rank 64 is above the width of the layer it adapts (32)"),
    ("lora-target-unknown", lambda w, t: _ft(w, t, "--finetune.adapter", "lora", "--finetune.lora-targets", "q,kv"),
     "unknown LoRA target module 'kv'"),
    ("lora-adapter-other-base", _adapter_on_another_base, "the adapter was trained on another base"),
    ("regression-not-numbers", lambda w, t: _ft(w, t, "--finetune.label-kind", "regression"),
     "regression needs numbers as labels"),
    ("split-unseen-label", _unseen_test_label, "test label 'meh' was not seen in training"),
    # -- planning, import, export
    ("cost-model", lambda w, t: ["cost", "gpt5-ultra"], "gpt5-ultra"),
    ("cost-mfu", lambda w, t: ["cost", "gpt2", "--mfu", "1.5"], "mfu"),
    ("cost-hardware", lambda w, t: ["cost", "gpt2", "--hardware", "h900"], "h900"),
    ("import-not-hf", lambda w, t: ["import", str(t), "--out", str(t / "run")], "no config.json"),
    ("import-pickle-only", _only_pickle_hf, "never unpickles"),
    ("import-not-gguf", lambda w, t: ["import", f"gguf:{_file(t, 'm.gguf', b'not a gguf file at all')}",
                                      "--out", str(t / "run")], "m.gguf"),
    ("import-int4-not-4bit", lambda w, t: ["import", f"gguf:{_q4_gguf(t, 'F32')}", "--weights", "int4",
                                           "--out", str(t / "run")], "keeps a file's Q4_0 or Q4_1 blocks"),
    ("import-int4-hf", lambda w, t: ["import", f"hf:{w / 'hf'}", "--weights", "int4", "--out", str(t / "run")],
     "a hf: source holds floats"),
    ("import-weights-int8", lambda w, t: ["import", f"gguf:{_q4_gguf(t, 'Q4_1')}", "--weights", "int8",
                                          "--out", str(t / "run")], "is not kept in a run"),
    ("int4-run-fp32", lambda w, t: ["generate", "AB", "--run", str(_int4_run(t)), "--weights", "fp32"],
                      "the run holds int4 weights"),
    ("int4-run-finetune", lambda w, t: ["finetune", "--init", str(_int4_run(t)), "--task", str(w / "task.csv"),
                                        "--out", str(t / "ft")], "to fine-tune or export it"),
    ("export-no-out", lambda w, t: ["export", str(w / "gpt")], "missing --out"),
    ("bench-dtype", lambda w, t: ["bench", "--peak", "--dtypes", "fp7", "--seconds", "0.1"], "unknown dtype 'fp7'"),
    ("bench-device", lambda w, t: ["bench", "--peak", "--device", "cuda", "--seconds", "0.1"], "no CUDA device"),
    ("demo-steps", lambda w, t: ["demo", "--gpt-steps", "-5", "--out", str(t / "demo")], "--gpt-steps -5 must be a positive"),
    ("demo-seeds", lambda w, t: ["demo", "--seeds", "0", "--out", str(t / "demo")], "--seeds 0 must be a positive count"),
    ("demo-tapt-steps", lambda w, t: ["demo", "--gpt-tapt-steps", "-1", "--out", str(t / "demo")],
     "--gpt-tapt-steps -1 must be 0 (none)"),
    ("export-format", lambda w, t: ["export", str(w / "gpt"), "--out", str(t / "x"), "--format", "onnx"],
     "unknown export format"),
    ("recipe-unknown", lambda w, t: _gpt(w, t, "--model.recipe", "gpt5"), "recipe='gpt5' is unknown"),
    ("no-decay-kind", lambda w, t: _gpt(w, t, "--train.no-decay", "bias,layernorm"), "'layernorm' is not a kind"),
    ("export-out-is-file", lambda w, t: ["export", str(w / "gpt"), "--out", str(_file(t, "x", "a file"))],
     "x is a file, not a folder"),
    *((f"out-under-file-{v}", lambda w, t, v=v: _under_a_file(w, t, v), "notes.txt is a file, not a folder")
      for v in WRITERS),
    ("serve-no-run", lambda w, t: ["serve"], "missing argument 'runs'"),
    ("serve-missing-run", lambda w, t: ["serve", str(t / "nope")], "the run directory does not exist"),
    ("serve-port", lambda w, t: ["serve", str(w / "gpt"), "--port", "70000"], "--port 70000 is not a TCP port"),
    ("serve-max-batch", lambda w, t: ["serve", str(w / "gpt"), "--max-batch", "0"], "--max-batch 0 must be at least 1"),
]

SUBPROCESS = {"unknown-verb", "data-truncated", "checkpoint-pickle", "resume-changed-model", "cost-mfu",
              "task-not-utf8", "corpus-binary", "generate-max-new-tokens", *(f"out-under-file-{v}" for v in WRITERS)}

# Cases that read the built-in corpus (or would, were the options good) run with the optional source
# 'austen' both present and hidden (conftest.py), so no machine state decides them.
AUSTEN = {"tokenizer-size": AUSTEN_STATES, "tokenizer-name": AUSTEN_STATES, "corpus-missing": AUSTEN_STATES,
          "austen-not-installed": ("austen-hidden",), "out-under-file-demo": AUSTEN_STATES}
PARAMS = [pytest.param(name, setup, needle, state, id=name if state is None else f"{name}-{state}")
          for name, setup, needle in CASES for state in AUSTEN.get(name, (None,))]


BAR = re.compile(r"\d+%\|.*\|")  # a tqdm progress bar (the work before the error was found)


def listing(root: Path) -> dict:
    """Every file and folder under root, with each file's size and modification time."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if n in files else None
    return out


def test_the_sweep_is_large_and_covers_every_verb(w, tmp_path):
    """At least 25 cases, and every command has some."""
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
    used = set()
    for i, (_name, setup, _needle) in enumerate(CASES):
        (tmp_path / str(i)).mkdir()
        argv = setup(w, tmp_path / str(i))
        if argv[0] != "--config":
            used.add(argv[0])
    assert set(VERBS) <= used, set(VERBS) - used


@pytest.mark.parametrize("name,setup,needle,austen_state", PARAMS, indirect=["austen_state"])
def test_bad_input(name, setup, needle, austen_state, w, tmp_path, capsys):
    if "CUDA" in needle and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    argv = setup(w, tmp_path)
    capsys.readouterr()
    before, ws_before = listing(tmp_path), listing(w)
    if name in SUBPROCESS:
        # in the case's folder, so that anything written to the working directory is seen
        path = os.pathsep.join(os.path.abspath(q) for q in os.environ.get("PYTHONPATH", "").split(os.pathsep) if q)
        p = subprocess.run([sys.executable, "-m", "pretune", *argv], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
        code, err = p.returncode, p.stderr
    else:
        code, err = main(argv), capsys.readouterr().err
    lines = [x for x in re.split(r"[\r\n]", err) if x.strip() and not BAR.search(x)]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("pretune: error:"), err
    assert needle in lines[0], lines[0]
    assert listing(tmp_path) == before  # nothing half-written, nothing new
    assert listing(w) == ws_before  # the shared runs and data are untouched


def test_an_output_that_cannot_be_created_is_one_line(tmp_path):
    """fileio.make_dir / check_creatable: the OS's refusal becomes bad input (PretuneError), and
    check_creatable creates nothing."""
    from pretune.errors import PretuneError
    from pretune.fileio import check_creatable, make_dir
    f = tmp_path / "f"
    f.write_text("a file")
    for call in (lambda: make_dir(f / "a" / "b", "the run directory"), lambda: make_dir(f, "the run directory"),
                 lambda: check_creatable(f / "a" / "b", "the run directory"), lambda: check_creatable(f, "the run")):
        with pytest.raises(PretuneError, match=f"^cannot create the run.*: {re.escape(str(f))} is a file, not a folder"):
            call()
    check_creatable(f, "the curated file", folder=False)  # a file output may replace a file
    with pytest.raises(PretuneError, match="File name too long"):  # names are at most 255 bytes
        make_dir(tmp_path / ("n" * 300))
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(0o555)
        with pytest.raises(PretuneError, match="is not writable"):
            check_creatable(ro / "x" / "y")
        with pytest.raises(PretuneError, match="Permission denied"):
            make_dir(ro / "x")
        ro.rmdir()
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
