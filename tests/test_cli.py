"""The command line end to end on a tiny corpus: prepare, pretrain, resume, generate, fill-mask."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretune.cli import main

TEXT = "\n\n".join(
    f"Document {i}. The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
    f"and the clocks were striking {i % 13}. Call me Ishmael. Some years ago, never mind how long."
    for i in range(300))

TINY_GPT = ["--arch.n-layer", "1", "--arch.d-model", "32", "--arch.n-head", "2", "--arch.max-seq-len", "32"]
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
            "--arch.vocab-size", "50257", "--arch.tokenizer", "gpt2", *TINY_GPT, *TRAIN]
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
    assert main(args[:-len(TINY_GPT) - len(TRAIN)] + ["--arch.n-layer", "2"] + TINY_GPT[2:] + TRAIN) == 2
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
    yaml_file.write_text("model: gpt-mini\narch:\n  n_layer: 1\n  d_model: 32\n  n_head: 2\n  max_seq_len: 32\n"
                         "  vocab_size: 50257\ntrain:\n  steps: 2\n  batch_size: 4\n  seq_len: 32\n  eval_every: 0\n"
                         "  eval_batches: 1\n")
    assert main(["pretrain", "--config", str(yaml_file), "--data", str(gpt_data), "--out", str(tmp_path / "a")]) == 0
    assert main(["pretrain", "--model", "gpt-mini", "--arch.n-layer", "1", "--arch.d-model", "32", "--arch.n-head",
                 "2", "--arch.max-seq-len", "32", "--arch.vocab-size", "50257", "--train.steps", "2",
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
    assert main(["pretrain", "--model", "bert-mini", "--data", str(data), "--out", str(run), "--arch.n-layer", "1",
                 "--arch.d-model", "32", "--arch.n-head", "2", "--arch.max-seq-len", "32", "--train.steps", "3",
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
    (["pretrain", "--arch.d-model", "100", "--arch.n-head", "3"], "not divisible"),
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
