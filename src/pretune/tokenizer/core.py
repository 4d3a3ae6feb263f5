"""The Tokenizer: a Hugging Face `tokenizers.Tokenizer` with its special ids named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..errors import PretuneError
from ..fileio import atomic_write_text


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
