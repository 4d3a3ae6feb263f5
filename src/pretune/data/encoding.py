"""Labelled examples as model inputs: the input template of each pre-training objective, padding, and the batches
of fine-tuning and evaluation."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PretuneError
from .labelled import Example


# ---- encoding --------------------------------------------------------------------

@dataclass
class Encoded:
    """Token ids of a list of examples, ready to batch."""

    ids: list[list[int]]
    segments: list[list[int]] | None  # encoders only
    labels: list[int]
    truncated: int = 0

    def __len__(self):
        return len(self.ids)


class TextEncoder:
    """How a text (or pair) becomes the model's input: the template of the body's pre-training
    objective (`Objective.template` in objectives/registry.py), "decoder" or "encoder":

    encoder  [CLS] A [SEP] (B [SEP]), segment ids 0 .. 0 (1 .. 1), as BERT (Devlin et al. 2019, fig. 2);
             the classifier reads the pooled [CLS].
    decoder  <s> A (<d> B) <e>, as GPT (Radford et al. 2018, sec. 3.3 and fig. 1): start,
             delimiter and extract tokens around the text; the classifier reads h at <e>,
             the last real token. The vocabulary's end-of-text token plays all three parts
             (it is the one separator the model met in pre-training, where every document
             ends with it), so no new embedding row is needed; GPT-1 added three learned ones.

    Texts longer than the window are cut (pairs: the longer text loses tokens from its
    end first, as BERT's _truncate_seq_pair); the special tokens are always kept.
    """

    def __init__(self, tok, template: str, max_len: int):
        if isinstance(template, bool):  # the old signature's `causal`: that family's template
            template = "decoder" if template else "encoder"
        if template not in ("decoder", "encoder"):
            raise PretuneError(f"unknown input template '{template}'", None, "use decoder or encoder")
        self.tok, self.template, self.max_len = tok, template, max_len
        self.pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
        if template == "decoder":
            self.sep = tok.eos_id if tok.eos_id is not None else tok.sep_id
            self.start = tok.bos_id if tok.bos_id is not None else self.sep
            if self.sep is None:
                raise PretuneError(f"the tokenizer '{tok.name}' has no end-of-text or [SEP] token to end a text "
                                   "with", None, "use the checkpoint's own tokenizer")
        else:
            if tok.cls_id is None or tok.sep_id is None:
                raise PretuneError(f"an encoder classifies from [CLS]; the tokenizer '{tok.name}' has no "
                                   "[CLS]/[SEP]", None, "use a WordPiece tokenizer (bert-uncased, wordpiece-N)")
            self.start, self.sep = tok.cls_id, tok.sep_id
        if max_len < 8:
            raise PretuneError(f"max_len={max_len} leaves no room for text", None, "use at least 8 tokens")

    def encode(self, examples: list[Example], what: str = "texts", warn=True) -> Encoded:
        tok = self.tok
        a = tok.encode_batch([e.text for e in examples], add_special_tokens=False, parse_special=False)
        has_b = [i for i, e in enumerate(examples) if e.text_b is not None]
        b: list = [None] * len(examples)
        for i, y in zip(has_b, tok.encode_batch([examples[i].text_b for i in has_b], add_special_tokens=False,
                                                 parse_special=False) if has_b else []):
            b[i] = y
        ids, segs, cut = [], ([] if self.template == "encoder" else None), 0
        for i, (x, y) in enumerate(zip(a, b)):
            if not x or (y is not None and not y):
                raise PretuneError(f"{what}: example {i + 1} has no tokens (an empty text)", None,
                                   "remove empty texts")
            room = self.max_len - (2 if y is None else 3)
            if len(x) + (len(y) if y is not None else 0) > room:
                cut += 1
                if y is None:
                    x = x[:room]
                else:
                    x, y = list(x), list(y)
                    while len(x) + len(y) > room:
                        (x if len(x) > len(y) else y).pop()  # BERT: on a tie B loses one
            if y is None:
                seq = [self.start, *x, self.sep]
                seg = [0] * len(seq)
            else:
                seq = [self.start, *x, self.sep, *y, self.sep]
                seg = [0] * (len(x) + 2) + [1] * (len(y) + 1)
            ids.append(seq)
            if segs is not None:
                segs.append(seg)
        if cut and warn:
            print(f"warning: {cut:,} of {len(examples):,} {what} were longer than {self.max_len} tokens "
                  f"and were truncated", file=sys.stderr)
        return Encoded(ids, segs, [e.label for e in examples], cut)


def collate(enc: Encoded, idx, pad_id: int) -> dict:
    """Right-padded tensors of the examples `idx`: input_ids, attention_mask (True at real
    tokens), segment_ids (encoders), labels, lengths; and `padded` (a bool: is any row
    shorter than the longest?), so that the model need not ask the device."""
    idx = list(idx)
    T = max(len(enc.ids[i]) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.bool)
    segs = torch.zeros((len(idx), T), dtype=torch.long) if enc.segments is not None else None
    for r, i in enumerate(idx):
        n = len(enc.ids[i])
        ids[r, :n] = torch.tensor(enc.ids[i])
        mask[r, :n] = True
        if segs is not None:
            segs[r, :n] = torch.tensor(enc.segments[i])
    out = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([enc.labels[i] for i in idx]),
           "lengths": mask.sum(1), "padded": any(len(enc.ids[i]) < T for i in idx)}
    if segs is not None:
        out["segment_ids"] = segs
    return out


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), *stream]))


class ClassificationBatches:
    """Training batches of a labelled set; batch k is a pure function of (seed, k) (module doc).

    With `mlm` = {"mask_id", "vocab_size", "special_ids"} each batch also carries BERT-masked
    copies of its inputs (mlm_input_ids, mlm_labels) for L3 on an encoder."""

    def __init__(self, enc: Encoded, batch_size: int, seed: int, pad_id: int, bucket: int = 8,
                 mlm: dict | None = None):
        if len(enc) == 0:
            raise PretuneError("no training examples", None, "give a task with labelled examples")
        self.enc, self.batch_size, self.seed, self.pad_id, self.bucket, self.mlm = \
            enc, batch_size, seed, pad_id, bucket, mlm
        self.rank, self.world, self.accum, self.micro = 0, 1, 1, 0
        self._set_sizes()
        self.batch = 0
        self._plan: tuple[int, list] | None = None

    def partition(self, rank: int, world: int, accum: int) -> "ClassificationBatches":
        """Rank-aware: step s's global batch is the one-process batch of batch_size x accum x world
        examples, and micro-batch a of rank r its part a W + r of A W near-equal parts."""
        self.rank, self.world, self.accum = int(rank), int(world), int(accum)
        self._set_sizes()
        self._plan = None
        return self

    def _set_sizes(self) -> None:
        self.parts = self.world * self.accum
        self.global_size = self.batch_size * self.parts
        if self.parts > len(self.enc):
            raise PretuneError(f"{len(self.enc)} training examples cannot fill {self.parts} micro-batches",
                               None, "use fewer processes or a smaller --train.grad-accum")
        self.per_epoch = math.ceil(len(self.enc) / self.global_size)  # the last batch may be short

    def epoch_plan(self, e: int) -> list[np.ndarray]:
        """The batches of epoch e, as arrays of example indices."""
        if self._plan is not None and self._plan[0] == e:
            return self._plan[1]
        rng = _rng(self.seed, 0, e)
        perm = rng.permutation(len(self.enc))
        lengths = np.array([len(x) for x in self.enc.ids])
        size = self.global_size
        chunk = size * self.bucket
        batches = []
        for s in range(0, len(perm), chunk):
            part = perm[s:s + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += [part[j:j + size] for j in range(0, len(part), size)]
        plan = [batches[i] for i in rng.permutation(len(batches))]
        self._plan = (e, plan)
        return plan

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        k, part = self.batch, self.micro * self.world + self.rank
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.batch = 0, self.batch + 1
        e, j = divmod(k, self.per_epoch)
        idx = self.epoch_plan(e)[j]
        void = False
        if self.parts > 1:
            whole, idx = idx, np.array_split(idx, self.parts)[part]
            if len(idx) == 0:  # a short last batch leaves this micro-batch no example: one stand-in row
                idx, void = whole[:1], True  # that every loss term weighs 0 (objectives.losses.loss_counts)
        batch = collate(self.enc, idx, self.pad_id)
        if void:
            batch["void"] = True
        if self.mlm is not None:
            from ..objectives.masking import mlm_rows
            x, y = self._masked(batch, idx, k)
            batch["mlm_input_ids"], batch["mlm_labels"], batch["mlm_rows"] = x, y, mlm_rows(y)
        return batch

    def _masked(self, batch: dict, idx, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's masks, each row's drawn from (seed, step k, its example) over its own tokens
        only: the same masks whichever rank, micro-batch and padded length the row lands in."""
        from ..objectives.linear_cross_entropy import IGNORE
        from ..objectives.masking import mlm_mask
        ids, x = batch["input_ids"], batch["input_ids"].clone()
        y = torch.full_like(ids, IGNORE)
        special_ids = torch.tensor(sorted(self.mlm["special_ids"]))
        for r, i in enumerate(idx):
            n = len(self.enc.ids[int(i)])
            row = ids[r:r + 1, :n]
            g = torch.Generator()
            g.manual_seed(int(_rng(self.seed, 1, k, int(i)).integers(1 << 62)))
            # every text has a token (empty ones are refused), and mlm_mask predicts one at least per row
            x[r:r + 1, :n], y[r:r + 1, :n] = mlm_mask(row, torch.isin(row, special_ids), self.mlm["mask_id"],
                                                      self.mlm["vocab_size"], g)
        return x, y

    def state_dict(self) -> dict:
        return {"batch": self.batch, "micro": self.micro, "unit": "step", "seed": self.seed,
                "examples": len(self.enc)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("examples") is not None and d["examples"] != len(self.enc):
            raise PretuneError(f"the training set changed since the checkpoint ({d['examples']:,} examples "
                               f"then, {len(self.enc):,} now)", None,
                               "resume with the same task and --train-examples, or start a new --out")
        if d.get("unit") == "step":
            self.batch, self.micro = int(d["batch"]), int(d.get("micro", 0))
        else:  # before rank-aware batches the counter counted micro-batches
            self.batch, self.micro = divmod(int(d["batch"]), self.accum)


def ordered_batches(enc: Encoded, batch_size: int, pad_id: int):
    """(indices, batch) over a whole set, sorted by length so batches pad little."""
    order = np.argsort([len(x) for x in enc.ids], kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, collate(enc, idx, pad_id)
