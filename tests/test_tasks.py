"""Labelled tasks: the built-in sets against counts read off the raw files, splits,
subsampling, user files, encoding and the batch source."""

import collections
import json

import numpy as np
import pytest
import torch

from pretune.data.encoding import ClassificationBatches, TextEncoder, collate
from pretune.data.labelled import (Example, load_task, make_task, normalise, read_labelled_file, stratified_split,
                                   subsample)
from pretune.errors import PretuneError
from pretune.tokenizer.vocabularies import train_tokenizer

WORDS = "good bad fine awful great terrible film movie plot actor scene story dull fun boring".split()


def corpus(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", 300, corpus())


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", 120, corpus())


# ---- built-in tasks: counts read independently off the raw files (docs/data.md) ----------

def test_movie_sentiment_threshold_and_counts():
    t = load_task("movie-sentiment")
    # 10,605 rated snippets; 533 with |score| < 0.5 dropped; 2 duplicate texts after normalising
    assert t.stats["rows"] == 10605 and t.stats["dropped_neutral"] == 533
    assert len(t.train) + len(t.val) + len(t.test) == 10605 - 533 - 2
    assert t.labels == ["negative", "positive"]
    counts = collections.Counter(e.label for s in (t.train, t.val, t.test) for e in s)
    # off the raw file: 4,996 rows score >= +0.5 and 5,076 <= -0.5; of the two texts that occur
    # twice (normalised), one is a pair of positive rows and one a pair of negative rows
    assert counts[1] == 4996 - 1 and counts[0] == 5076 - 1
    label, acc = t.majority_baseline("test")
    assert label == "negative" and 0.49 < acc < 0.52


def test_trec_deduplicated_and_sms_spam():
    t = load_task("trec")
    assert t.stats["rows"] == 15452 and t.stats["unique_lines"] == 5382
    assert t.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(t.train) + len(t.val) + len(t.test) == 5380  # by normalised question text
    s = load_task("spam")  # an alias
    assert s.name == "sms-spam" and s.labels == ["ham", "spam"]
    assert len(s.train) + len(s.val) + len(s.test) == 4511  # unique messages of 4,837


def test_splits_are_stratified_disjoint_and_fixed():
    t = load_task("tweet-sentiment")
    keys = {s: {normalise(e.text) for e in t.split(s)} for s in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    n = collections.Counter(e.label for s in ("train", "val", "test") for e in t.split(s))
    for c in (0, 1):
        test_c = sum(e.label == c for e in t.test)
        assert test_c == int(n[c] * 0.1 + 0.5)  # exactly 10% of each class, rounded half up
    again = load_task("tweet-sentiment")
    assert [e.text for e in again.test] == [e.text for e in t.test]


def test_make_task_dedupes_and_drops_conflicts():
    rows = [("Great film", None, "pos"), ("great   FILM", None, "pos"), ("awful", None, "neg"),
            ("meh", None, "pos"), ("MEH", None, "neg")] + [(f"text {i}", None, "pos" if i % 2 else "neg")
                                                          for i in range(20)]
    t = make_task("toy", rows)
    assert t.stats["duplicates"] == 2 and t.stats["conflicting_labels"] == 1  # "great   FILM", "MEH"
    assert t.stats["examples"] == 22
    texts = [normalise(e.text) for s in ("train", "val", "test") for e in t.split(s)]
    assert "meh" not in texts and texts.count("great film") == 1
    assert t.labels == ["neg", "pos"]


def test_stratified_split_by_hand():
    keys = [f"k{i}" for i in range(25)]
    labels = [0] * 20 + [1] * 5
    where = stratified_split(keys, labels)
    c = collections.Counter(zip(labels, where))
    assert (c[(0, "train")], c[(0, "val")], c[(0, "test")]) == (16, 2, 2)
    assert (c[(1, "train")], c[(1, "val")], c[(1, "test")]) == (3, 1, 1)  # 0.5 rounds up


def test_one_class_is_refused():
    with pytest.raises(PretuneError, match="1 class"):
        make_task("toy", [(f"t{i}", None, "a") for i in range(10)])


def test_subsample_stratified_nested_and_covers_every_class():
    t = load_task("trec")
    s100 = subsample(t.train, 100, 6, seed=0)
    s1000 = subsample(t.train, 1000, 6, seed=0)
    assert len(s100) == 100 and len(s1000) == 1000
    c = collections.Counter(e.label for e in s100)
    assert set(c) == set(range(6))  # ABBR (1.6%) still present
    full = collections.Counter(e.label for e in t.train)
    for k in range(1, 6):
        assert abs(c[k] - 100 * full[k] / len(t.train)) <= 1.5
    assert {e.text for e in s100} <= {e.text for e in s1000}
    assert [e.text for e in subsample(t.train, 100, 6, seed=1)] != [e.text for e in s100]


# ---- user files ----------------------------------------------------------------------

def test_user_csv_pairs_and_jsonl(tmp_path):
    f = tmp_path / "nli.csv"
    f.write_text("premise,hypothesis,gold\n" + "".join(f"p {i},h {i},{'yes' if i % 3 else 'no'}\n"
                                                         for i in range(30)))
    t = load_task(f, "premise,hypothesis", "gold")
    assert t.pair and t.labels == ["no", "yes"] and t.name == "nli"
    assert all(e.text_b is not None for e in t.train)
    j = tmp_path / "x.jsonl"
    j.write_text("".join(json.dumps({"text": f"t {i}", "label": i % 2}) + "\n" for i in range(20)))
    t = load_task(j)
    assert t.labels == ["0", "1"] and not t.pair


def test_user_file_errors(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("text,label\nhello,1\n,0\n")
    with pytest.raises(PretuneError, match="row 2 has an empty text"):
        read_labelled_file(f)
    with pytest.raises(PretuneError, match="no label column 'gold'.*columns: text, label"):
        read_labelled_file(f, "text", "gold")
    with pytest.raises(PretuneError, match="unknown task"):
        load_task("movie-sentimnt")


@pytest.mark.parametrize("label, kind", [({"y": 1}, "an object"), ([1], "a list"), (True, "a boolean"),
                                         (1.0, "a float"), (0.5, "a float")])
def test_jsonl_label_that_is_not_a_string_or_an_integer_is_refused_with_its_line(tmp_path, label, kind):
    """A label must be a string or an integer: an object, a list, a boolean or a float would be
    stringified into a class of its own ("{'y': 1}", "True", "1.0" beside "1"). The line number
    counts every line of the file, blank ones included."""
    j = tmp_path / "x.jsonl"
    good = [json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(4)]
    j.write_text("\n".join(good[:2] + ["", json.dumps({"text": "odd", "label": label})] + good[2:]) + "\n")
    with pytest.raises(PretuneError) as e:
        read_labelled_file(j)
    assert str(e.value).startswith(f"line 4 has {kind} as its label") and str(j) in str(e.value)


@pytest.mark.parametrize("text", [{"t": "a"}, ["a", "b"], 7, None])
def test_jsonl_text_that_is_not_a_string_is_refused_with_its_line(tmp_path, text):
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"text": "fine", "label": "a"}) + "\n" + json.dumps({"text": text, "label": "b"}) + "\n")
    with pytest.raises(PretuneError, match="^line 2 has (an empty text|a non-string text) in column 'text'"):
        read_labelled_file(j)


def test_jsonl_string_and_integer_labels_are_kept(tmp_path):
    j = tmp_path / "x.jsonl"
    j.write_text("".join(json.dumps({"text": f"t {i}", "label": [2, "pos", 10][i % 3]}) + "\n" for i in range(6)))
    assert [y for _, _, y in read_labelled_file(j)] == ["2", "pos", "10"] * 2


# ---- encoding and batches ------------------------------------------------------------

def test_decoder_encoding_start_text_extract(bpe):
    te = TextEncoder(bpe, template="decoder", max_len=64)
    enc = te.encode([Example("good film", 1), Example("bad", 0, "awful plot")])
    eos = bpe.eos_id
    assert enc.ids[0] == [eos, *bpe.encode("good film", add_special_tokens=False), eos]
    assert enc.ids[1] == [eos, *bpe.encode("bad", add_special_tokens=False), eos,
                          *bpe.encode("awful plot", add_special_tokens=False), eos]
    assert enc.segments is None


def test_encoder_encoding_matches_tokenizer_pairs(wordpiece):
    te = TextEncoder(wordpiece, template="encoder", max_len=64)
    enc = te.encode([Example("good film", 1), Example("bad", 0, "awful plot")])
    assert (enc.ids[0], enc.segments[0]) == wordpiece.encode_pair("good film")
    assert (enc.ids[1], enc.segments[1]) == wordpiece.encode_pair("bad", "awful plot")


def test_truncation_keeps_special_tokens_and_counts(wordpiece, capsys):
    te = TextEncoder(wordpiece, template="encoder", max_len=10)
    long = " ".join(["good"] * 30)
    enc = te.encode([Example(long, 0), Example("fine", 1), Example(long, 1, "dull " * 20)], "texts")
    assert enc.truncated == 2
    assert [len(x) for x in enc.ids] == [10, 3, 10]
    assert enc.ids[0][0] == wordpiece.cls_id and enc.ids[0][-1] == wordpiece.sep_id
    a_len = enc.segments[2].count(0) - 2
    assert a_len == 4 and enc.segments[2].count(1) == 4  # the longer loses first, B on a tie: 4 + 3 + 3 specials
    assert capsys.readouterr().err.count("truncated") == 1


def test_collate_right_pads_with_mask(bpe):
    te = TextEncoder(bpe, template="decoder", max_len=64)
    enc = te.encode([Example("good", 0), Example("good film great plot", 1)])
    b = collate(enc, [0, 1], pad_id=te.pad_id)
    n0, n1 = len(enc.ids[0]), len(enc.ids[1])
    assert b["input_ids"].shape == (2, n1)
    assert b["attention_mask"].tolist() == [[True] * n0 + [False] * (n1 - n0), [True] * n1]
    assert b["lengths"].tolist() == [n0, n1] and b["labels"].tolist() == [0, 1]
    assert b["padded"] is True and collate(enc, [1], pad_id=te.pad_id)["padded"] is False  # known on the host


def test_batches_pure_function_of_seed_and_k_and_epochs_are_permutations(bpe):
    te = TextEncoder(bpe, template="decoder", max_len=64)
    ex = [Example(t, i % 2) for i, t in enumerate(corpus(53, seed=3))]
    enc = te.encode(ex)
    src = ClassificationBatches(enc, 8, seed=5, pad_id=te.pad_id, bucket=2)
    seq = [next(src) for _ in range(20)]
    assert src.per_epoch == 7
    for e in range(2):  # each epoch shows every example once
        idx = np.concatenate(src.epoch_plan(e))
        assert sorted(idx.tolist()) == list(range(53))
    fresh = ClassificationBatches(enc, 8, seed=5, pad_id=te.pad_id, bucket=2)
    fresh.load_state_dict(src.state_dict() | {"batch": 13})
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(next(fresh).values(), seq[13].values()))
    # another seed, another order: the first epoch's batches hold other examples
    other = ClassificationBatches(enc, 8, seed=6, pad_id=te.pad_id, bucket=2)
    mine, theirs = src.epoch_plan(0), other.epoch_plan(0)
    assert [set(a.tolist()) != set(b.tolist()) for a, b in zip(mine, theirs)] == [True] * 7
    first = next(other)  # and its batch 0 is the first of those, not seed 5's
    assert torch.equal(first["input_ids"], collate(enc, theirs[0], te.pad_id)["input_ids"])
    assert not torch.equal(first["input_ids"], seq[0]["input_ids"])
    # bucketing: less padding than batches cut from the permutation as it is
    lengths = np.array([len(x) for x in enc.ids])
    perm = np.random.default_rng(0).permutation(53)
    plain = sum((lengths[perm[j:j + 8]].max() * len(perm[j:j + 8]) - lengths[perm[j:j + 8]].sum())
                for j in range(0, 53, 8))
    bucketed = sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in seq[:7])
    assert bucketed < plain


def test_resume_refuses_a_changed_training_set(bpe):
    te = TextEncoder(bpe, template="decoder", max_len=64)
    enc = te.encode([Example(t, i % 2) for i, t in enumerate(corpus(20))])
    src = ClassificationBatches(enc, 4, 0, te.pad_id)
    with pytest.raises(PretuneError, match="training set changed"):
        src.load_state_dict({"batch": 3, "examples": 21})


def test_mlm_copy_masks_text_not_specials(wordpiece):
    te = TextEncoder(wordpiece, template="encoder", max_len=64)
    enc = te.encode([Example(t, i % 2) for i, t in enumerate(corpus(40))])
    mlm = {"mask_id": wordpiece.mask_id, "vocab_size": wordpiece.vocab_size, "special_ids": wordpiece.special_ids}
    b = next(ClassificationBatches(enc, 16, 0, te.pad_id, mlm=mlm))
    chosen = b["mlm_labels"] != -100
    assert chosen.any()
    assert torch.equal(b["mlm_labels"][chosen], b["input_ids"][chosen])
    special = torch.isin(b["input_ids"], torch.tensor(sorted(wordpiece.special_ids))) | ~b["attention_mask"]
    assert not (chosen & special).any()
    assert torch.equal(b["mlm_input_ids"][~chosen], b["input_ids"][~chosen])


def test_unlabelled_text_holds_the_training_split_only(tmp_path):
    from pretune.data.labelled import write_unlabelled
    rows = [(f"review number {i} was {'good' if i % 2 else 'bad'}", None, str(i % 2)) for i in range(50)]
    t = make_task("toy", rows)
    n = write_unlabelled(t, tmp_path / "u.txt")
    docs = (tmp_path / "u.txt").read_text().strip().split("\n\n")
    assert n == len(docs) == len(t.train)
    assert set(docs) == {e.text for e in t.train} and not set(docs) & {e.text for e in t.val + t.test}
