"""BERT's masking of the MLM input: which positions are predicted, and what they are replaced with."""

from __future__ import annotations

import torch

from .linear_cross_entropy import IGNORE


MLM_P = 0.15  # the share of tokens masked-LM predicts (Devlin et al. 2019, sec. 3.1); FLOPs and MFU read it
              # through objectives.registry ("MLM+NSP".predicted)


def mlm_mask(input_ids, special_mask, mask_id: int, vocab_size: int, generator: torch.Generator,
             p: float = MLM_P, p_mask: float = 0.8, p_random: float = 0.1):
    """BERT's masking. Each non-special token is chosen independently with
    probability p (Bernoulli, as Hugging Face's collator does; BERT's own script
    draws exactly round(15% of n) per sequence); a chosen token becomes [MASK]
    with probability 0.8, a token drawn uniformly from the vocabulary with 0.1,
    and stays unchanged with 0.1. Returns (masked input ids, labels), labels
    IGNORE where nothing is predicted. Special tokens are never chosen.

    Every sequence (last dimension) with a non-special token predicts at least
    one, as BERT's script does (max(1, round(0.15 n))): a row the Bernoulli draw
    left empty takes its non-special token of smallest u, a uniform choice among
    them from the same draw, so the generator's stream, and every other row, is
    unchanged. Without it a short pair ([CLS] a [SEP] b [SEP]) predicts nothing
    with probability 0.85^2 = 0.72, and a batch of such rows gives a NaN loss."""
    u = torch.rand(input_ids.shape, generator=generator)
    eligible = ~special_mask
    chosen = (u < p) & eligible
    empty = eligible.any(-1, keepdim=True) & ~chosen.any(-1, keepdim=True)
    smallest = u.masked_fill(~eligible, 2.0).argmin(-1, keepdim=True)
    chosen |= torch.zeros_like(chosen).scatter_(-1, smallest, empty)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    r = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (r < p_mask)
    to_random = chosen & (r >= p_mask) & (r < p_mask + p_random)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels


def mlm_rows(labels) -> torch.Tensor:
    """The flat indices (into labels.reshape(-1)) of the positions that predict a token. The
    loaders compute them on the CPU with the batch: found on a GPU, their number (a boolean
    index) is a host sync every step."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
