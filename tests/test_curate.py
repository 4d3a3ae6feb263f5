"""Curation: quality filters, exact and near dedup, decontamination, and their hook in prepare.

References are independent of the code under test: Jaccard similarities by set
arithmetic on word 5-grams, filter fractions by hand arithmetic on documents built
to land just past one threshold, n-gram overlaps placed by construction."""

import json
import math

import numpy as np
import pytest

from pretune.data import corpora as C, sources
from pretune.data.curate import Curator
from pretune.data.curate_filters import DUP_NGRAM_MAX, CurateConfig, MinHash, candidate_probability, quality_failure
from pretune.errors import PretuneError

# -- text builders -------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
_LETTERS = np.array(list("bcdfghjklmnprstvwz"))
# 6,000 distinct made-up five-letter words: text drawn from them without replacement has no
# repeated n-gram at all, so every repetition in a test document is one the test put there.
POOL = list(dict.fromkeys("".join(_RNG.choice(_LETTERS, 5)) for _ in range(8000)))[:6000]


def filler(n: int, seed: int = 0) -> list[str]:
    """n distinct five-letter words, with three stop words in front (the Gopher stop-word rule)."""
    rng = np.random.default_rng(seed)
    return ["the", "and", "of"] + [POOL[i] for i in rng.choice(len(POOL), n - 3, replace=False)]


def shingle_set(text: str, k: int = 5) -> set:
    w = text.lower().split()
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def exact_jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def edit(ws: list[str], n_changes: int, seed: int) -> list[str]:
    """ws with n_changes words replaced by words from outside the pool's first use."""
    rng = np.random.default_rng(seed)
    out = list(ws)
    for i in rng.choice(np.arange(3, len(ws)), n_changes, replace=False):
        out[i] = "x" + POOL[int(rng.integers(len(POOL)))]
    return out


# -- MinHash and near duplicates -------------------------------------------------------------


def test_minhash_estimate_tracks_exact_jaccard():
    mh = MinHash(128, seed=1)
    base = filler(400, seed=1)
    for changes in (2, 8, 20, 40, 80):
        other = edit(base, changes, seed=changes)
        a, b = " ".join(base), " ".join(other)
        j = exact_jaccard(a, b)
        est = float(np.mean(mh.of_text(a) == mh.of_text(b)))
        # 128 independent agreements with probability J: standard deviation sqrt(J(1-J)/128)
        assert abs(est - j) <= 4 * math.sqrt(j * (1 - j) / 128) + 0.02, (changes, j, est)
    assert np.array_equal(MinHash(128, 1).of_text(a), mh.of_text(a))  # seeded: the same every time
    assert not np.array_equal(MinHash(128, 2).of_text(a), mh.of_text(a))


def test_s_curve_by_hand():
    # 1 - (1 - 0.8^8)^16: 0.8^8 = 0.16777216, 0.83222784^16 = 0.052951
    assert candidate_probability(0.8, 16, 8) == pytest.approx(1 - 0.83222784 ** 16, abs=1e-9)
    assert candidate_probability(0.8, 16, 8) == pytest.approx(0.947049, abs=1e-6)
    assert candidate_probability(0.5, 16, 8) == pytest.approx(1 - (1 - 1 / 256) ** 16, abs=1e-12)


def test_near_duplicates_are_caught_and_unrelated_documents_kept():
    base = filler(300, seed=2)
    near = edit(base, 3, seed=3)               # three words changed
    far = edit(base, 45, seed=4)               # every shingle of 15% of the words hit
    unrelated = filler(300, seed=5)
    j_near = exact_jaccard(" ".join(base), " ".join(near))
    j_far = exact_jaccard(" ".join(base), " ".join(far))
    assert j_near > 0.85 and j_far < 0.5       # the references, by set arithmetic
    cur = Curator(["near"])
    assert cur(" ".join(base)) == [" ".join(base)]
    assert cur(" ".join(near)) == []
    assert cur(" ".join(far)) == [" ".join(far)]
    assert cur(" ".join(unrelated)) == [" ".join(unrelated)]
    rep = cur.report()
    assert rep["removed"]["near"]["documents"] == 1 and rep["kept"]["documents"] == 3


def test_exact_duplicates_up_to_case_and_spacing():
    doc = " ".join(filler(80, seed=6))
    cur = Curator(["exact"])
    assert cur(doc) == [doc]
    assert cur("  " + doc.upper().replace(" ", " \n ")) == []
    changed = doc.replace(doc.split()[40], "zzzzz")
    assert cur(changed) == [changed]
    assert cur.report()["removed"]["exact"] == {"documents": 1, "bytes": len(doc) + 2 + 2 * doc.count(" ")}


def test_a_source_read_twice_is_not_its_own_duplicate():
    docs = [" ".join(filler(80, seed=s)) for s in range(5)] + [" ".join(filler(80, seed=0))]
    cur = Curator(["exact", "near"])
    read = cur.wrap("src", lambda: iter(docs))
    assert list(read()) == docs[:5]
    assert list(read()) == docs[:5]            # the second epoch replays the first's decisions
    assert cur.report()["input"]["documents"] == 6 and cur.report()["removed"]["exact"]["documents"] == 1


# -- quality -----------------------------------------------------------------------------------


def test_normal_text_of_the_builtin_corpus_passes():
    assert quality_failure(next(sources.wikipedia())) is None
    assert quality_failure(next(sources.movie_dialogs())) is None
    assert quality_failure(" ".join(filler(200))) is None  # the builders' own baseline


@pytest.mark.parametrize("austen_state", ["austen-present"], indirect=True)
def test_normal_text_of_austen_passes(austen_state):
    assert quality_failure(next(C.austen())) is None


def _lines(n_lines: int, per_line: int, seed: int) -> list[str]:
    ws = filler(n_lines * per_line, seed)
    return [" ".join(ws[i * per_line:(i + 1) * per_line]) for i in range(n_lines)]


def _top(k: int, n: int, m: int) -> str:
    """n words, among them a k-word phrase of five-letter words m times: its share of the
    characters is m * 5k / (5n - 7) (the three stop words are 7 characters short)."""
    ws = filler(n - m * k, seed=10 + k)
    phrase = POOL[-k:]
    step = len(ws) // m
    out = []
    for i in range(m):
        out += ws[i * step:(i + 1) * step] + phrase
    return " ".join(out + ws[m * step:])


def _dup(k: int, n: int = 1000) -> str:
    """n words where one segment of L >= k words appears twice, L chosen so the share of characters
    in repeated k-grams, 2 * 5L / (5n - 7), lands 0.005 above the k-gram threshold (and so below
    the (k-1)-gram one: the thresholds step by 0.01)."""
    L = round((DUP_NGRAM_MAX[k] + 0.005) * (5 * n - 7) / 10)
    assert L >= k and DUP_NGRAM_MAX[k] < 10 * L / (5 * n - 7) < DUP_NGRAM_MAX.get(k - 1, 1.0)
    ws = filler(n - L, seed=20 + k)
    seg = ws[100:100 + L]
    return " ".join(ws[:500] + seg + ws[500:])


BAD = {
    "word_count": lambda: "The cat sat with the dog and that was all.",
    "mean_word_length": lambda: " ".join(["the", "of", "to", "be", "a", "is", "it", "an", "as", "at"] * 6),
    "symbol_ratio": lambda: " ".join(filler(100)) + " #tag" * 12,                  # 12 / 112 > 0.1
    "bullet_lines": lambda: "\n".join("- " + ln for ln in _lines(10, 8, 1)),        # 10 / 10 > 0.9
    "ellipsis_lines": lambda: "\n".join(ln + ("..." if i < 4 else ".") for i, ln in enumerate(_lines(10, 12, 2))),
    "alpha_words": lambda: " ".join(w if i % 4 else "1999" for i, w in enumerate(filler(100))),  # 25% digits
    "stop_words": lambda: " ".join(POOL[:100]),
    "dup_lines": lambda: "\n".join((ls := _lines(10, 8, 3)) + ls[:5]),             # 5 / 15 > 0.3
    # 1 of 10 lines repeats (< 0.3), but it holds 2 * 200 / (2 * 200 + 8 * 40) chars > 0.2
    "dup_line_chars": lambda: "\n".join([(long := _lines(1, 40, 4)[0])] + _lines(8, 8, 5) + [long]),
    # 2 of 5 paragraphs repeat (> 0.3); 2 of 23 lines (< 0.3) holding few characters
    "dup_paragraphs": lambda: "\n\n".join(["\n".join(_lines(10, 6, 6)), "\n".join(_lines(10, 6, 7))]
                                          + [" ".join(POOL[-12:-7])] * 3),
    "top_2gram": lambda: _top(2, 200, 30),   # 30 * 10 / 993 = 0.30 > 0.20
    "top_3gram": lambda: _top(3, 250, 20),   # 20 * 15 / 1243 = 0.24 > 0.18; its 2-grams 0.16 < 0.20
    "top_4gram": lambda: _top(4, 300, 15),   # 15 * 20 / 1493 = 0.20 > 0.16; 3-grams 0.15, 2-grams 0.10
    **{f"dup_{k}gram": (lambda k=k: _dup(k)) for k in DUP_NGRAM_MAX},
}


@pytest.mark.parametrize("name", list(BAD))
def test_each_quality_filter_triggers_on_its_bad_document(name):
    assert quality_failure(BAD[name]()) == name


def test_the_paragraph_character_filter():
    # a repeated paragraph's lines repeat too, so with Gopher's equal thresholds (0.2) the line
    # filter fires first; with the line filters off the paragraph one catches it. A one-line
    # paragraph of 64 words (383 chars) twice, and two of 5 lines x 8 words (5 x 47 + 4 chars):
    # lines 1/12 repeat (< 0.3) holding 383 / (2 * 383 + 10 * 47) = 0.31 of the chars (> 0.2);
    # paragraphs 1/4 repeat (< 0.3) holding 383 / (2 * 383 + 2 * 239) = 0.31 (> 0.2)
    long = " ".join(filler(64, 8))
    doc = "\n\n".join([long, "\n".join(_lines(5, 8, 9)), "\n".join(_lines(5, 8, 10)), long])
    assert quality_failure(doc) == "dup_line_chars"
    assert quality_failure(doc, cfg=CurateConfig(max_dup_line_chars=1.0)) == "dup_paragraph_chars"


def test_quality_counts_per_filter():
    cur = Curator(["quality"])
    for name in ("word_count", "stop_words", "stop_words"):
        assert cur(BAD[name]()) == []
    ok = " ".join(filler(120))
    assert cur(ok) == [ok]
    assert cur.report()["removed"]["quality"]["filters"] == {"word_count": 1, "stop_words": 2}


# -- decontamination ---------------------------------------------------------------------------


@pytest.fixture
def eval_file(tmp_path):
    p = tmp_path / "eval.txt"
    p.write_text("The quick brown fox jumps over the lazy dog while seven tired hunters "
                 "watch from the old stone bridge at dawn.\n"
                 "Who wrote the opera about the barber of seville?\n"   # 9 words: checked whole
                 "What is love?\n")                                     # 3 words: too short
    return str(p)


def _doc_with(words: list[str], seed: int) -> str:
    ws = filler(200, seed)
    return " ".join(ws[:100] + words + ws[100:])


def test_a_13_gram_is_caught_and_a_12_gram_is_not(eval_file):
    ev = "the quick brown fox jumps over the lazy dog while seven tired hunters watch from".split()
    cur = Curator(["decontaminate"], eval_sets=[eval_file])
    thirteen = _doc_with([w.upper() + "," for w in ev[2:15]], 1)   # case and punctuation do not hide it
    twelve = _doc_with(ev[2:14], 2)
    assert cur(thirteen) == []
    assert cur(twelve) == [twelve]
    whole = _doc_with("who wrote the opera about the barber of seville".split(), 3)
    assert cur(whole) == []                                        # a short eval text, whole
    partial = _doc_with("who wrote the opera about the barber of".split(), 4)
    assert cur(partial) == [partial]
    short = _doc_with("what is love".split(), 5)
    assert cur(short) == [short]                                   # under 8 words: not checked
    d = cur.report()["removed"]["decontaminate"]
    assert d["documents"] == 2 and d["eval_texts"] == 3 and d["eval_texts_too_short"] == 1
    assert d["eval_ngrams"] == (21 - 13 + 1) + 1    # the 21-word text's 13-grams, the 9-word text


def test_builtin_task_test_split_is_decontaminated():
    from pretune.data.labelled import load_task
    ex = next(e.text for e in load_task("movie-sentiment").test if len(e.text.split()) >= 16)
    doc = _doc_with(ex.split(), 6)
    cur = Curator(["decontaminate"], eval_sets=["movie-sentiment"])
    assert cur(doc) == []
    assert "movie-sentiment test" in cur.report()["removed"]["decontaminate"]["eval_sets"][0]


def test_cut_mode_removes_the_collision_and_keeps_the_pieces(eval_file):
    ev = "the quick brown fox jumps over the lazy dog while seven tired hunters".split()
    doc = _doc_with(ev, 7)
    cur = Curator(["decontaminate"], {"mode": "cut"}, eval_sets=[eval_file])
    pieces = cur(doc)
    assert len(pieces) == 2 and all(len(p) >= 200 for p in pieces)
    assert not any("quick brown" in p for p in pieces)
    head = doc[:doc.index("the quick")]
    assert doc.startswith(pieces[0]) and len(pieces[0]) < len(head) - 150  # 200 chars before it gone
    assert cur.report()["removed"]["decontaminate"]["cut"]["documents"] == 1


# -- prepare, the command line, bad input ---------------------------------------------------------


def _corpus(tmp_path, eval_file) -> str:
    """30 distinct documents, 4 exact copies, 2 near copies, 3 too short, 1 contaminated."""
    docs = [" ".join(filler(120, seed=100 + i)) for i in range(30)]
    docs += [docs[0], docs[1], docs[2].upper(), docs[3]]
    docs += [" ".join(edit(docs[4].split(), 2, seed=1)), " ".join(edit(docs[5].split(), 2, seed=2))]
    docs += ["Too short to keep.", "Also far too short.", "Short."]
    docs += [_doc_with("fox jumps over the lazy dog while seven tired hunters watch from the".split(), 8)]
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(p)


def test_prepare_with_curation_records_each_step(tmp_path, eval_file):
    from pretune.data.prepare import prepare
    from pretune.data.tokenizers import load_tokenizer
    corpus = _corpus(tmp_path, eval_file)
    meta = prepare([corpus], load_tokenizer("gpt2"), tmp_path / "d", val_fraction=0.2, progress=False,
                   curate=["default"], decontaminate=[eval_file], weights={"corpus": 2.0})
    cur = meta["curation"]
    assert cur["steps"] == ["quality", "exact", "near", "decontaminate"]
    assert cur["input"]["documents"] == 40
    removed = {s: r["documents"] for s, r in cur["removed"].items()}
    assert removed == {"quality": 3, "exact": 4, "near": 2, "decontaminate": 1}
    assert cur["removed"]["quality"]["filters"] == {"word_count": 3}
    assert cur["kept"]["documents"] == 30
    n = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert n == 60                             # weight 2: both epochs of the 30 kept documents
    on_disk = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert on_disk["curation"]["removed"]["exact"]["documents"] == 4


def test_cli_curate_and_prepare(tmp_path, eval_file, capsys):
    from pretune.cli import main
    corpus = _corpus(tmp_path, eval_file)
    out = tmp_path / "cur" / "kept.jsonl"
    assert main(["curate", corpus, "--out", str(out), "--steps", "all", "--decontaminate", eval_file,
                 "--progress", "false"]) == 0
    kept = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(kept) == 30 and {k["source"] for k in kept} == {"corpus"}
    rep = json.loads((tmp_path / "cur" / "kept.report.json").read_text())
    assert rep["removed"]["near"]["documents"] == 2
    assert "decontaminate" in capsys.readouterr().out
    assert main(["prepare", "--corpus", corpus, "--tokenizer", "gpt2", "--out", str(tmp_path / "d"),
                 "--curate", "quality,exact", "--val-fraction", "0.2"]) == 0
    kept = json.loads((tmp_path / "d" / "meta.json").read_text())["curation"]["kept"]["documents"]
    assert kept == 40 - 3 - 4                  # the short ones and the exact copies


@pytest.mark.parametrize("args,message", [
    (["--curate", "qualty"], "unknown curation step 'qualty'"),
    (["--decontaminate", "no-such-task"], "unknown task 'no-such-task'"),
    (["--curate", "decontaminate"], "needs evaluation sets"),
])
def test_bad_curation_input_is_one_line_exit_2(tmp_path, eval_file, capsys, args, message):
    from pretune.cli import main
    corpus = _corpus(tmp_path, eval_file)
    out = tmp_path / "d"
    capsys.readouterr()
    assert main(["prepare", "--corpus", corpus, "--tokenizer", "gpt2", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("pretune: error:")
    assert not out.exists()
    with pytest.raises(PretuneError):
        Curator(["near"], {"bands": 7})                       # 7 does not divide 128
    assert main(["curate", corpus, "--out", str(tmp_path / "k.jsonl"), "--steps", "dedup"]) == 2
    assert not (tmp_path / "k.jsonl").exists()
