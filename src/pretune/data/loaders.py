"""Reading prepared shards: memory-mapped token files and the resumable batch loaders of pre-training
(token windows for a decoder, sentence pairs with MLM masking for an encoder).

`LOADERS` maps the loader name an objective declares (`objectives.registry.Objective.batches`) to
its class; each class makes its training batches (`for_training`) and its fixed validation
batches (`validation`), so `training_batches` and `validation_batches` serve every objective."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import PretuneError


# -- reading --------------------------------------------------------------------------

class Shard:
    """One split of a prepared folder, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        mp = self.dir / "meta.json"
        if not mp.is_file():
            raise PretuneError("not a prepared data folder (no meta.json)", str(self.dir),
                               "run `pretune prepare --out` to make one")
        try:
            self.meta = json.loads(mp.read_text())
            self.meta["splits"], self.meta["dtype"]
        except (ValueError, KeyError, TypeError) as e:
            raise PretuneError(f"meta.json is damaged ({type(e).__name__}: {e})", str(mp),
                               "prepare the data again") from e
        if split not in self.meta["splits"]:
            raise PretuneError(f"no split '{split}'", str(self.dir), f"use one of {', '.join(self.meta['splits'])}")
        info = self.meta["splits"][split]
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        try:
            self.tokens = np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")
            self.sents = np.memmap(self.dir / f"{split}.sents.bin", dtype=np.int64, mode="r").reshape(-1, 2)
            self.docs = np.memmap(self.dir / f"{split}.docs.bin", dtype=np.int64, mode="r")
        except (OSError, ValueError) as e:
            raise PretuneError(f"cannot read the {split} shard: {e}", str(self.dir), "prepare the data again") from e
        if len(self.tokens) != info["tokens"] or len(self.docs) != info["documents"] + 1:
            raise PretuneError(f"the {split} shard does not match meta.json (truncated?)", str(self.dir),
                               "prepare the data again")

    def __len__(self) -> int:
        return len(self.tokens)


def unigram_entropy(data_dir, split: str = "val", chunk: int = 1 << 22, exclude=()) -> float:
    """H = -sum_v p(v) ln p(v) in nats, p the token frequencies of the split itself: the
    loss of the best context-free model of that text, the bar a language model must clear
    (document separators count as tokens, as the LM loss counts them). `exclude`: token ids
    left out, e.g. the special tokens masked-LM never predicts."""
    shard = Shard(data_dir, split)
    counts = np.zeros(int(shard.meta["vocab_size"]), np.int64)
    for i in range(0, len(shard), chunk):
        counts += np.bincount(shard.tokens[i:i + chunk], minlength=len(counts))[:len(counts)]
    counts[[i for i in exclude if 0 <= i < len(counts)]] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def batch_generator(seed: int, k: int) -> torch.Generator:
    """The generator of batch k: seeded from (seed, k) through numpy's SeedSequence,
    so batches are independent of each other and of how many were read before."""
    state = np.random.SeedSequence([int(seed) % (1 << 64), int(k)]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return g


class _Resumable:
    """The step counter is the whole state (the batch of step s depends on (seed, s) only).

    Rank-aware: the global batch of step s is one draw of batch_size x accum x world rows from
    the generator of (seed, s); micro-batch a of rank r is its rows [(a W + r) B, (a W + r + 1) B).
    So the union over the ranks and micro-batches of step s is exactly the one-process batch of
    step s with the same global batch, whatever the world size (`partition`)."""

    rank, world, accum, micro = 0, 1, 1, 0
    _cached: tuple[int, dict] | None = None

    def partition(self, rank: int, world: int, accum: int) -> "_Resumable":
        """Read rank `rank`'s share of each global batch of `world` x `accum` micro-batches."""
        self.rank, self.world, self.accum = int(rank), int(world), int(accum)
        self._cached = None
        return self

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        B, W, A = self.batch_size, self.world, self.accum
        lo = (self.micro * W + self.rank) * B
        if W == 1 and A == 1:
            out = self._make(batch_generator(self.seed, self.batch), B)
        else:
            out = self._rows(self.batch, B * A * W, lo, lo + B)
        self.micro += 1
        if self.micro == A:
            self.micro, self.batch = 0, self.batch + 1
        return out

    def _rows(self, step: int, n: int, lo: int, hi: int) -> dict:
        """Rows [lo, hi) of the global batch of `step` (n rows), built once per step."""
        if self._cached is None or self._cached[0] != step:
            self._cached = (step, self._make(batch_generator(self.seed, step), n))
        return _slice_rows(self._cached[1], lo, hi)

    def state_dict(self) -> dict:
        return {"batch": self.batch, "micro": self.micro, "unit": "step", "seed": self.seed, "split": self.split,
                "tokens": len(self.shard)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("tokens") is not None and d["tokens"] != len(self.shard):
            raise PretuneError(f"the data changed since the checkpoint ({d['tokens']:,} {self.split} tokens then, "
                               f"{len(self.shard):,} now)", str(self.shard.dir),
                               "resume with the original data folder, or start a new run")
        if d.get("unit") == "step":
            self.batch, self.micro = int(d["batch"]), int(d.get("micro", 0))
        else:  # before rank-aware loading the counter counted micro-batches
            self.batch, self.micro = divmod(int(d["batch"]), self.accum)
        self._cached = None


def _slice_rows(batch: dict, lo: int, hi: int) -> dict:
    """Rows [lo, hi) of every per-row tensor of a batch; MLM's flat row indices found again."""
    out = {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and k != "mlm_rows" else v for k, v in batch.items()}
    if "mlm_rows" in batch:
        from ..objectives.masking import mlm_rows
        out["mlm_rows"] = mlm_rows(out["labels"])
    return out


class LMBatches(_Resumable):
    """Next-token batches for L1: B windows at uniformly random offsets (nanoGPT's
    sampling: every token is a window start with equal probability, and documents
    follow one another across their separators)."""

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, seed: int):
        self.shard = Shard(data_dir, split)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.batch = 0
        if len(self.shard) < seq_len + 1:
            raise PretuneError(f"the {split} split has {len(self.shard):,} tokens, fewer than seq_len + 1 = "
                               f"{seq_len + 1}", str(data_dir), "lower the sequence length or give more text")

    def _windows(self, starts: np.ndarray) -> dict:
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        buf = torch.from_numpy(self.shard.tokens[idx].astype(np.int64))
        return {"input_ids": buf[:, :-1], "targets": buf[:, 1:]}

    def _make(self, g: torch.Generator, n: int) -> dict:
        starts = torch.randint(len(self.shard) - self.seq_len, (n,), generator=g)
        return self._windows(starts.numpy())

    def _rows(self, step: int, n: int, lo: int, hi: int) -> dict:
        """Only this micro-batch's windows are read: the draw of all n starts is what they share."""
        starts = torch.randint(len(self.shard) - self.seq_len, (n,), generator=batch_generator(self.seed, step))
        return self._windows(starts[lo:hi].numpy())

    @classmethod
    def for_training(cls, data_dir, split, batch_size, seq_len, seed, tokenizer=None) -> "LMBatches":
        return cls(data_dir, split, batch_size, seq_len, seed)

    @classmethod
    def validation(cls, data_dir, split, batch_size, seq_len, n_batches, seed=0) -> Iterator[dict]:
        """n_batches * batch_size windows at evenly spaced offsets over the whole split."""
        lm = cls(data_dir, split, batch_size, seq_len, seed)
        n = len(lm.shard) - seq_len - 1
        starts = np.linspace(0, n, n_batches * batch_size).astype(np.int64)
        for b in range(n_batches):
            yield lm._windows(starts[b * batch_size:(b + 1) * batch_size])


class PairBatches(_Resumable):
    """Sentence-pair batches for MLM + NSP, following BERT's create_pretraining_data.py:

    - a target length of seq_len - 3 tokens, or with probability short_seq_prob (0.1)
      a uniform one in [2, seq_len - 3], so the model also sees short sequences;
    - a chunk of consecutive sentences of a random document, filled up to that length,
      cut after a random sentence into A and the rest B (IsNext, probability 0.5), or
      A and sentences of a random other document (NotNext: never another copy of A's own,
      as a mixing weight above 1 or a duplicate puts in the shard); a one-sentence chunk
      is cut at a random token instead, so IsNext keeps exactly probability 0.5;
    - the longer segment is truncated until both fit: A loses tokens at its front and B
      at its back, so an IsNext pair stays two adjacent spans of the text;
    - [CLS] A [SEP] B [SEP], segment ids 0/1, [PAD] to seq_len (attention_mask False there);
    - MLM masking by objectives.mlm_mask with the batch's generator, special tokens never chosen,
      at least one token predicted per pair (BERT's max(1, round(0.15 n))).
    """

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, seed: int,
                 tokenizer_special: dict | None = None, vocab_size: int | None = None,
                 short_seq_prob: float = 0.1):
        self.shard = Shard(data_dir, split)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.short_seq_prob = short_seq_prob
        self.batch = 0
        sp = {k.removesuffix("_id"): v for k, v in (tokenizer_special or self.shard.meta["special"]).items()}
        self.cls, self.sep, self.pad, self.mask = sp.get("cls"), sp.get("sep"), sp.get("pad"), sp.get("mask")
        if None in (self.cls, self.sep, self.pad, self.mask):
            raise PretuneError(f"sentence pairs need [CLS], [SEP], [PAD] and [MASK]; the tokenizer "
                               f"'{self.shard.meta['tokenizer']}' lacks some", str(data_dir),
                               "prepare the data with bert-uncased or wordpiece-N")
        self.special = torch.tensor(sorted({v for v in sp.values() if v is not None}))
        self.vocab_size = vocab_size or self.shard.meta["vocab_size"]
        if seq_len < 8:
            raise PretuneError(f"seq_len={seq_len} is too short for sentence pairs", None, "use at least 8")
        if len(self.shard.docs) - 1 < 2:
            raise PretuneError(f"the {split} split has fewer than 2 documents; NotNext pairs need another one",
                               str(data_dir), "give more documents")
        self.n_sents = len(self.shard.sents)

    @classmethod
    def for_training(cls, data_dir, split, batch_size, seq_len, seed, tokenizer=None) -> "PairBatches":
        if tokenizer is None:
            return cls(data_dir, split, batch_size, seq_len, seed)
        return cls(data_dir, split, batch_size, seq_len, seed, tokenizer_special=tokenizer.special_dict(),
                   vocab_size=tokenizer.vocab_size)

    @classmethod
    def validation(cls, data_dir, split, batch_size, seq_len, n_batches, seed=0) -> Iterator[dict]:
        """The first n_batches pair batches of a PairBatches seeded with `seed`."""
        pb = cls(data_dir, split, batch_size, seq_len, seed)
        for k in range(n_batches):
            yield pb._make(batch_generator(seed, k), batch_size)

    def _doc_of(self, s: int) -> tuple[int, int]:
        """[first, end) sentence indices of the document holding sentence s."""
        docs = self.shard.docs
        d = int(np.searchsorted(docs, s, side="right")) - 1
        return int(docs[d]), int(docs[d + 1])

    def _fill(self, s: int, de: int, target: int) -> int:
        """End (exclusive) of the chunk of sentences s.. that first reaches `target` tokens."""
        sents = self.shard.sents
        L = sents[s:de, 1] - sents[s, 0]
        return min(s + 1 + int(np.searchsorted(L, target)), de)

    def _outside(self, v: float, ds: int, n_doc: int) -> int:
        """The sentence a uniform v in [0, 1) picks among those outside the document [ds, ds + n_doc)."""
        r = min(int(v * (self.n_sents - n_doc)), self.n_sents - n_doc - 1)
        return r + n_doc if r >= ds else r

    def _same_text(self, ds: int, de: int, rds: int, rde: int) -> bool:
        """Do the documents of sentences [ds, de) and [rds, rde) hold the same tokens?"""
        sents = self.shard.sents
        if de - ds != rde - rds or ds == rds:
            return ds == rds
        a0, a1, b0, b1 = int(sents[ds, 0]), int(sents[de - 1, 1]), int(sents[rds, 0]), int(sents[rde - 1, 1])
        return a1 - a0 == b1 - b0 and np.array_equal(self.shard.tokens[a0:a1], self.shard.tokens[b0:b1])

    def _pair(self, u: np.ndarray) -> tuple[int, int, int, int, int]:
        """(A start, A end, B start, B end, NSP label) for one example, from uniforms u."""
        sents = self.shard.sents
        M = self.seq_len - 3
        target = M if u[0] >= self.short_seq_prob else 2 + int(u[1] * (M - 1))
        is_next = u[2] < 0.5
        s = min(int(u[3] * self.n_sents), self.n_sents - 1)
        ds, de = self._doc_of(s)
        if is_next and s == de - 1 and de - ds >= 2:
            s -= 1  # start one sentence earlier so a next sentence exists
        e = self._fill(s, de, target)
        if is_next and e - s == 1 and e < de:
            e += 1
        if is_next:
            if e - s >= 2:
                cut = int(sents[s + 1 + int(u[4] * (e - s - 1)), 0])
            else:  # a single sentence: cut it at a random token
                n = int(sents[s, 1] - sents[s, 0])
                cut = int(sents[s, 0]) + 1 + int(u[4] * (n - 1)) if n >= 2 else None
            if cut is not None:
                a0, a1, b0, b1 = int(sents[s, 0]), cut, cut, int(sents[e - 1, 1])
                label = 0
            else:
                is_next = False
        if not is_next:
            a_end = s + 1 + int(u[4] * (e - s - 1)) if e - s >= 2 else e
            a0, a1 = int(sents[s, 0]), int(sents[a_end - 1, 1])
            n_doc = de - ds
            r = self._outside(u[5], ds, n_doc)  # a uniform sentence outside this document
            rds, rde = self._doc_of(r)
            tries = 0
            while self._same_text(ds, de, rds, rde):
                # another copy of this document (a mixing weight above 1, or a duplicate in the
                # corpus): its text is this document's, so draw again, from a generator seeded by u
                tries += 1
                if tries > 64:
                    raise PretuneError(f"the {self.split} split holds copies of one document only; NotNext pairs "
                                       "need another one", str(self.shard.dir), "give more documents")
                r = self._outside(np.random.default_rng([int(u[5] * 2 ** 53), tries]).random(), ds, n_doc)
                rds, rde = self._doc_of(r)
            re_ = self._fill(r, rde, max(1, target - (a1 - a0)))
            b0, b1 = int(sents[r, 0]), int(sents[re_ - 1, 1])
            label = 1
        la, lb = a1 - a0, b1 - b0
        if la + lb > M:  # truncate the longer one first, never below half the room
            if la >= lb:
                la = max(M - lb, M - M // 2)
                lb = min(lb, M - la)
            else:
                lb = max(M - la, M - M // 2)
                la = min(la, M - lb)
        return a1 - la, a1, b0, b0 + lb, label

    def _make(self, g: torch.Generator, n: int) -> dict:
        B, T = n, self.seq_len
        u = torch.rand(B, 6, generator=g, dtype=torch.float64).numpy()
        ids = np.full((B, T), self.pad, np.int64)
        seg = np.zeros((B, T), np.int64)
        att = np.zeros((B, T), bool)
        nsp = np.zeros(B, np.int64)
        toks = self.shard.tokens
        for i in range(B):
            a0, a1, b0, b1, nsp[i] = self._pair(u[i])
            la, lb = a1 - a0, b1 - b0
            n = la + lb + 3
            ids[i, 0] = self.cls
            ids[i, 1:1 + la] = toks[a0:a1]
            ids[i, 1 + la] = self.sep
            ids[i, 2 + la:2 + la + lb] = toks[b0:b1]
            ids[i, n - 1] = self.sep
            seg[i, 2 + la:n] = 1
            att[i, :n] = True
        input_ids = torch.from_numpy(ids)
        from ..objectives.masking import mlm_mask, mlm_rows

        special = torch.isin(input_ids, self.special) | ~torch.from_numpy(att)
        masked, labels = mlm_mask(input_ids, special, self.mask, self.vocab_size, g)
        return {"input_ids": masked, "segment_ids": torch.from_numpy(seg), "attention_mask": torch.from_numpy(att),
                "labels": labels, "nsp_labels": torch.from_numpy(nsp),
                "mlm_rows": mlm_rows(labels)}  # found here, on the CPU: no host sync in the loss


LOADERS: dict[str, type] = {"windows": LMBatches, "pairs": PairBatches}


def loader(name: str) -> type:
    """The loader class registered under `name`; an unknown name fails in one line naming the near ones."""
    if name not in LOADERS:
        import difflib
        near = difflib.get_close_matches(str(name), LOADERS, n=2)
        raise PretuneError(f"unknown batch loader '{name}'", None,
                           (f"did you mean {' or '.join(near)}? " if near else "")
                           + f"use one of {', '.join(LOADERS)} (data/loaders.py LOADERS)")
    return LOADERS[name]


def training_batches(name: str, data_dir, batch_size: int, seq_len: int, seed: int, tokenizer=None):
    """The resumable training batches of the loader `name` (`tokenizer`: the run's, for the special ids)."""
    return loader(name).for_training(data_dir, "train", batch_size, seq_len, seed, tokenizer)


def validation_batches(name: str, data_dir, split: str, batch_size: int, seq_len: int, n_batches: int = 10,
                       seed: int = 0) -> Iterator[dict]:
    """A fixed set of validation batches of the loader `name`, identical on every call (the loss
    estimate then compares like with like across steps)."""
    return loader(name).validation(data_dir, split, batch_size, seq_len, n_batches, seed)
