"""Positions: how the Transformer knows where each token is, one class per kind in `POSITIONS`.

    learned  W_p, a trained table added to h_0 (GPT-1/2/3, BERT)
    rotary   q and k rotated by the position (Su et al. 2021; Llama)

A kind says everything the rest of the package asks about it: its parameters (counted from the
config, torch-free: the cost planner counts through this file), its rules on the config, the
module it needs and the Transformer attribute that holds it (so state-dict keys stay `wpe.weight`),
what it adds to h_0, what it does to q and k, an additive attention bias (ALiBi's kind would
return one), how far it reaches and how the window is extended, and whether its module is one
of the embeddings `--freeze embeddings` freezes. To add a kind: one subclass of `Position`
here and a `register` call; nothing else changes.

torch is imported inside the methods only, so that this file stays torch-free at load.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

from ..errors import PretuneError


class Position:
    """A kind of position information. The defaults are "none": nothing added, nothing rotated."""

    name: ClassVar[str] = ""
    attribute: ClassVar[str | None] = None  # the Transformer attribute holding build(c): its state-dict prefix
    embedding: ClassVar[bool] = False  # counted under count_params' `embedding`, frozen by --freeze embeddings

    @staticmethod
    def n_params(c) -> int:
        """Parameters of build(c), from the config alone."""
        return 0

    @staticmethod
    def validate(c) -> tuple[str, str] | None:
        """(what is wrong, what to do) when the config cannot use this kind, else None."""
        return None

    @staticmethod
    def build(c):
        """The module installed at `attribute` (or None: no state)."""
        return None

    # At run time `m` is the module build(c) made (None if it made none); `pos` (T,) absolute positions.
    @staticmethod
    def embed(m, h, pos):
        """h_0 with the position added (B, T, d)."""
        return h

    @staticmethod
    def rotate(m, q, k, pos):
        """q, k (B, H, T, hd) as the attention scores them."""
        return q, k

    @classmethod
    def rotates(cls) -> bool:
        """Whether `rotate` does anything: the model skips the call per layer when it does not."""
        return cls.rotate is not Position.rotate

    @staticmethod
    def bias(m, c, pos, n_keys: int):
        """An additive attention bias (H or 1, T, n_keys), or None; the same for every layer."""
        return None

    @staticmethod
    def max_positions(m, c) -> int:
        """The longest sequence this kind can place."""
        return c.max_seq_len

    @staticmethod
    def extend(m, c, n: int):
        """(module, config) for a window of n > max_positions tokens."""
        return m, c.replace(max_seq_len=n)


class Learned(Position):
    """W_p: a row per position, added to the token embedding (Radford et al. 2018; Devlin et al. 2019)."""

    name, attribute, embedding = "learned", "wpe", True

    @staticmethod
    def n_params(c) -> int:
        return c.max_seq_len * c.d_model

    @staticmethod
    def build(c):
        import torch.nn as nn
        return nn.Embedding(c.max_seq_len, c.d_model)

    @staticmethod
    def embed(m, h, pos):
        return h + m(pos)

    @staticmethod
    def max_positions(m, c) -> int:
        return m.num_embeddings

    @staticmethod
    def extend(m, c, n: int):
        """The new rows copy the trained table cyclically, as done to extend BERT/Longformer
        (Beltagy et al. 2020)."""
        import torch.nn as nn
        old = m.weight.data
        new = nn.Embedding(n, c.d_model).to(old.device, old.dtype)
        reps = (n + old.shape[0] - 1) // old.shape[0]
        new.weight.data.copy_(old.repeat(reps, 1)[:n])
        return new, c.replace(max_seq_len=n)


class Rotary(Position):
    """Rotary positions (Su et al. 2021), `layers.RotaryEmbedding`: no parameters, its cos/sin
    tables are non-persistent buffers (nothing in the state dict)."""

    name, attribute = "rotary", "rope"

    @staticmethod
    def validate(c):
        if c.head_dim % 2:
            return f"rotary positions need an even head_dim, got {c.head_dim}", "change d_model or n_head"
        return None

    @staticmethod
    def build(c):
        from .layers import RotaryEmbedding
        return RotaryEmbedding(c)

    @staticmethod
    def rotate(m, q, k, pos):
        return m(q, pos), m(k, pos)

    @staticmethod
    def max_positions(m, c) -> int:
        return m.cos.shape[0]

    @staticmethod
    def extend(m, c, n: int):
        """Position interpolation: positions scaled by max_seq_len / n (Chen et al. 2023)."""
        device = m.cos.device
        m.scaling = c.rope_scaling * n / c.max_seq_len
        m._build(n)
        m.to(device)
        return m, c.replace(max_seq_len=n, rope_scaling=m.scaling)


POSITIONS: dict[str, type[Position]] = {}


def register(kind: type[Position]) -> type[Position]:
    """Add a kind under its name (usable as a class decorator)."""
    POSITIONS[kind.name] = kind
    return kind


for _k in (Learned, Rotary):
    register(_k)


def get(c) -> type[Position]:
    """The kind `c.position` names, checked against `c`: a one-line error for an unknown name
    (naming the near one) or a config the kind cannot use."""
    kind = POSITIONS.get(c.position)
    where = f"model '{c.name}'"
    if kind is None:
        near = difflib.get_close_matches(str(c.position), POSITIONS, n=1)
        raise PretuneError(f"impossible model config: position={c.position!r} is unknown", where,
                           (f"did you mean '{near[0]}'? " if near else "") + f"use one of {', '.join(POSITIONS)}")
    bad = kind.validate(c)
    if bad:
        raise PretuneError(f"impossible model config: {bad[0]}", where, bad[1])
    return kind
