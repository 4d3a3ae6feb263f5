"""Decoding several prompts of different lengths as one batch: what a server does with concurrent
generation requests (static batching, as Orca's and vLLM's papers call serving requests together;
Yu et al. 2022, Kwon et al. 2023).

The rows share one slot timeline: a prompt of L tokens is left-padded into slots [P - L, P) of a
P-slot prefill (P the longest prompt), then every step writes one slot for every row. A row's
positions are its own (slot - (P - L)), so each row sees exactly what `generate.generate` gives
it alone; a key mask hides the pad slots. Decoding a few rows costs nearly what one row costs
(the weights are read once per step: matrix-vector becomes a small matrix product), which is
where the batched tokens/s comes from (src/pretune_bench/serve_load.py, docs/serve.md).

Each row samples with its own options and its own seeded generator, drawing the same random
numbers as `generate` would for it alone (`sample_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PretuneError
from ..models.layers import KVCache
from ..models.quantize import cache_dtype
from .generate import check_sampling, next_token_probs


@dataclass
class Sampling:
    """One request's sampling options (as `pretune generate`'s)."""
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 1.0
    seed: int | None = 1337


def _forward(model, ids, pos, keys, cache: KVCache, real=None):
    """h_n of `ids` (B, T) at per-row positions `pos` (B, T), continuing `cache`; `keys` (B, S)
    marks the slots a query may see, S = cache.pos + T (the causal limit inside the chunk is
    added here). `real` (B, T): the real tokens, for a routed feed-forward layer."""
    B, T = ids.shape
    start = cache.pos
    S = start + T
    m = model.position_module
    h = model.position.embed(m, model.wte(ids), pos)  # W_p[pos], per row
    if model.wse is not None:
        h = h + model.wse(torch.zeros_like(ids))
    if model.emb_norm is not None:
        h = model.emb_norm(h)
    causal = torch.ones(T, S, dtype=torch.bool, device=ids.device).tril(start)
    mask = keys[:, None, None, :S] & causal
    # a pad query sees only itself: a row of no keys would be NaN, and NaN values in the cache
    # poison the masked sums (0 * NaN) of the real queries in the next layer
    diag = torch.zeros(T, S, dtype=torch.bool, device=ids.device)
    diag[torch.arange(T), start + torch.arange(T)] = True
    mask = mask | diag
    rotate_pos = pos[:, None, :]  # (B, 1, T): broadcasts over heads in a table lookup (rotary)

    def rotate(q, k, _pos):
        return model.position.rotate(m, q, k, rotate_pos)

    for i, block in enumerate(model.blocks):
        h = block(h, rotate, pos, mask, cache, i, real, None)
    if model.norm_f is not None:
        h = model.norm_f(h)
    cache.pos += T
    return h


def sample_rows(logits: torch.Tensor, opts: list[Sampling], gens: list) -> torch.Tensor:
    """One token per row, row b with opts[b] and generator gens[b]; the same draw as
    `generate.sample_next` on that row alone. Rows with equal options are filtered together."""
    out = torch.empty(logits.shape[0], 1, dtype=torch.long, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for b, o in enumerate(opts):
        groups.setdefault((o.temperature, o.top_k or None, o.top_p), []).append(b)
    for (temp, k, p), rows in groups.items():
        sel = logits[rows]
        if temp <= 0:
            out[rows] = sel.argmax(-1, keepdim=True)
            continue
        probs = next_token_probs(sel, temp, k, p)  # filtered together, row by row
        for j, b in enumerate(rows):  # drawn with each row's own generator: its own random stream
            out[b] = torch.multinomial(probs[j:j + 1], 1, generator=gens[b])[0]
    return out


@torch.inference_mode()
def generate_ragged(model, prompts: list[list[int]], opts: list[Sampling], eos_id: int | None = None):
    """Continue prompts of different lengths together. Yields, after each step, a list with
    each row's new token (an int), or None for a row that has finished (its budget spent, its
    window full, or end-of-text produced). Stops when every row has finished."""
    c = model.config
    if not c.causal:
        raise PretuneError("generation needs a decoder (causal) model", None, "use fill-mask for an encoder")
    if model.position.bias(model.position_module, c, torch.arange(1), 1) is not None:
        raise PretuneError(f"batched decoding does not handle the position kind '{c.position}' (a bias)",
                           None, "serve with --max-batch 1")
    W = model.max_positions
    B = len(prompts)
    lens = [len(p) for p in prompts]
    for o, L in zip(opts, lens):
        check_sampling(o.max_new_tokens, o.temperature, o.top_k, o.top_p)
        if not 0 < L < W:
            raise PretuneError(f"the prompt has {L} tokens; the model's window is {W}", None, "shorten the prompt")
    budget = [min(o.max_new_tokens, W - L) for o, L in zip(opts, lens)]
    P = max(lens)
    p = next(model.parameters())
    dev = p.device
    cache = KVCache(c, B, P + max(budget), dev, cache_dtype(model, dev))  # fp32 on the CPU: quantize.cache_dtype
    ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    keys = torch.zeros(B, P + max(budget), dtype=torch.bool, device=dev)
    for b, pr in enumerate(prompts):
        ids[b, P - lens[b]:] = torch.tensor(pr, device=dev)
        keys[b, P - lens[b]:] = True
    offset = torch.tensor([P - L for L in lens], device=dev)
    pos = (torch.arange(P, device=dev)[None, :] - offset[:, None]).clamp(0, W - 1)
    gens = [torch.Generator(device=dev).manual_seed(o.seed) if o.seed is not None else None for o in opts]
    model.eval()
    V = c.vocab_size
    # prompts of one length stay aligned: the Transformer's own causal pass, no masks (as `generate`)
    aligned = len(set(lens)) == 1
    if aligned:
        logits = model.logits(model(ids, cache=cache)[:, -1])[:, :V]
    else:
        logits = model.logits(_forward(model, ids, pos, keys, cache, keys[:, :P].clone())[:, -1])[:, :V]
    made = [0] * B
    done = [False] * B
    step_pos = torch.tensor(lens, device=dev)
    while True:
        nxt = sample_rows(logits.float(), opts, gens)
        row = []
        for b in range(B):
            if done[b]:
                row.append(None)
                continue
            t = int(nxt[b, 0])
            made[b] += 1
            row.append(t)
            if made[b] >= budget[b] or (eos_id is not None and t == eos_id):
                done[b] = True
        yield row
        if all(done):
            return
        if aligned:
            logits = model.logits(model(nxt, cache=cache)[:, -1])[:, :V]
        else:
            keys[:, cache.pos] = True
            logits = model.logits(_forward(model, nxt, step_pos.clamp(max=W - 1)[:, None], keys, cache)[:, -1])[:, :V]
        step_pos = step_pos + 1
