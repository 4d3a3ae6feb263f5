"""log P(continuation | context) for a decoder, with the lm-evaluation-harness's request
conventions, computed once per shared context through the KV cache.

Conventions (lm_eval/api/model.py, `_encode_pair` and `loglikelihood`, v0.4): the context's
trailing spaces move to the continuation; the whole string is encoded and the continuation is
what follows the context's own tokens; the tokenizer's own special tokens only (no BOS unless its
post-processor adds one); an empty context is the prefix token (BOS, else end-of-text). A request
longer than the window is refused, or with truncate="left" cut from the left as the harness does
((context + continuation)[-(window + 1):]).

The scorer's economies (issue 16, item 7): the longest token prefix that every request shares
(k-shot demonstrations) is computed once; the choices of one context share that context's KV
cache; single requests are sorted by length and batched with right padding (causal attention
never looks right, so padding needs no mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PretuneError
from ..models.layers import KVCache


@dataclass(frozen=True)
class Scored:
    """One request's answer: the summed log-likelihood (nats), whether greedy decoding gives the
    continuation, and the number of continuation tokens."""
    loglik: float
    greedy: bool
    n_tokens: int


def prefix_id(tok) -> int:
    """The token an empty context stands for: BOS if the vocabulary has one, else end-of-text
    (HFLM.prefix_token_id)."""
    i = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if i is None:
        raise PretuneError(f"the tokenizer '{tok.name}' has neither a BOS nor an end-of-text token", None,
                           "give the context text, or use a tokenizer with <|endoftext|>")
    return i


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them."""
    if context == "":
        cont = tok.encode(continuation, add_special_tokens=False)
        p = prefix_id(tok)
        return ([p], cont) if not cont or cont[0] != p else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def encode_requests(tok, pairs) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tok, c, x) for c, x in pairs]


def fit_window(requests, window: int, truncate: str | None, where: str = "the task"):
    """Each request within `window` input tokens: refused, or cut from the left (truncate='left')."""
    if truncate not in (None, "none", "left"):
        raise PretuneError(f"unknown --tasks.truncate '{truncate}'", where, "use left, or leave it out to refuse")
    out = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise PretuneError(f"request {i + 1} has an empty continuation", where, "give every choice some text")
        if len(ctx) + len(cont) <= window + 1:
            out.append((ctx, cont))
        elif truncate == "left" and len(cont) <= window:
            whole = (ctx + cont)[-(window + 1):]
            out.append((whole[:-len(cont)], cont))
        else:
            raise PretuneError(f"request {i + 1} has {len(ctx) + len(cont) - 1} input tokens, more than the "
                               f"model's window of {window}", where,
                               "pass --tasks.truncate left to cut the context from the left, or shorten it")
    return out


def _common_prefix(seqs) -> int:
    first = seqs[0]
    n = min(map(len, seqs))
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


def _expand(cache: KVCache | None, c, rows: int, length: int, device, dtype) -> KVCache | None:
    """A cache of `rows` rows holding the prefix of `cache` (its row 0), room for `length` tokens."""
    if cache is None or cache.pos == 0:
        return None
    new = KVCache(c, rows, length, device, dtype)
    for a, b in zip(new.k + new.v, cache.k + cache.v):
        a[:, :, :cache.pos] = b[:1, :, :cache.pos]
    new.pos = cache.pos
    return new


class Scorer:
    """Sums log P(continuation | context) over token requests for a decoder `model`."""

    def __init__(self, model, batch_size: int = 16, progress: bool = True, logit_chunk: int = 2048):
        if not model.config.causal:
            raise PretuneError("log-likelihood scoring needs a decoder (causal) model", None,
                               "use an encoder's MLM head with a cloze pattern (--tasks ... on a prompted task)")
        self.model, self.batch_size, self.progress, self.logit_chunk = model.eval(), batch_size, progress, logit_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.V = model.config.vocab_size

    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """log-softmax over the real vocabulary for hidden states (N, d), in float32, in chunks."""
        out = [self.model.logits(h[i:i + self.logit_chunk])[..., :self.V].float().log_softmax(-1)
               for i in range(0, h.shape[0], self.logit_chunk)]
        return torch.cat(out) if out else h.new_zeros(0, self.V)

    def _run(self, rows, offsets, conts, cache, first_lp, results, idx, row_of=None):
        """Forward right-padded `rows` (continuing `cache`, expanded to the rows) and score each
        `conts[i]`, read from row row_of[i] (default i), whose token j is predicted at row position
        offsets[i] + j (< 0: by `first_lp`)."""
        row_of = row_of or list(range(len(conts)))
        T = max(1, max(map(len, rows)))
        pad = [r + [0] * (T - len(r)) for r in rows]
        ids = torch.tensor(pad, device=self.device)
        start = cache.pos if cache is not None else 0
        h = None
        if any(rows):
            h = self.model(ids, cache=_expand(cache, self.model.config, len(rows), start + T, self.device, self.dtype))
        sel_r, sel_t, tgt, owner = [], [], [], []
        for i, (off, cont) in enumerate(zip(offsets, conts)):
            for j, t in enumerate(cont):
                if off + j >= 0:
                    sel_r.append(row_of[i]), sel_t.append(off + j), tgt.append(t), owner.append(i)
        sums = [0.0] * len(conts)
        greedy = [True] * len(conts)
        if sel_r:
            lp = self._logprobs(h[torch.tensor(sel_r), torch.tensor(sel_t)])
            t = torch.tensor(tgt, device=lp.device)
            got = lp.gather(1, t[:, None])[:, 0].double().tolist()
            arg = (lp.argmax(-1) == t).tolist()
            for o, g, a in zip(owner, got, arg):
                sums[o] += g
                greedy[o] = greedy[o] and a
        for i, (off, cont) in enumerate(zip(offsets, conts)):
            if off < 0:  # the first token, predicted from the shared prefix's last position
                sums[i] += float(first_lp[cont[0]])
                greedy[i] = greedy[i] and int(first_lp.argmax()) == cont[0]
            results[idx[i]] = Scored(sums[i], greedy[i], len(cont))

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """One `Scored` per (context ids, continuation ids), in order. Contexts must be non-empty
        (encode_pair gives the prefix token for an empty one) and fit the window (fit_window)."""
        from tqdm import tqdm

        if not requests:
            return []
        model = self.model
        results: list[Scored | None] = [None] * len(requests)
        # 1. the prefix every context shares (the k-shot demonstrations), computed once
        p = _common_prefix([ctx for ctx, _ in requests])
        p = min(p, min(len(ctx) for ctx, _ in requests))
        prefix_cache, prefix_lp = None, None
        if p >= 2 and len(requests) > 1:
            prefix_cache = KVCache(model.config, 1, p, self.device, self.dtype)
            h = model(torch.tensor([requests[0][0][:p]], device=self.device), cache=prefix_cache)
            prefix_lp = self._logprobs(h[0, -1:])[0]
        else:
            p = 0
        # 2. group by context: the choices of one context share its cache
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        singles = sorted((g[0] for g in groups.values() if len(g) == 1),
                         key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        shared = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: -len(requests[g[0]][0]))
        # choices of one token each (labels, most multiple choice): one row per context, batched,
        # every choice read at the context's last position
        one = [g for g in shared if all(len(requests[i][1]) == 1 for i in g)]
        shared = [g for g in shared if not all(len(requests[i][1]) == 1 for i in g)]
        bar = tqdm(total=len(requests), desc="scoring", unit="request", disable=not self.progress, leave=False)
        for b in range(0, len(singles), self.batch_size):  # 3. single requests: sorted, batched
            idx = singles[b:b + self.batch_size]
            rows = [(requests[i][0][p:] + requests[i][1])[:-1] for i in idx]
            offs = [len(requests[i][0]) - p - 1 for i in idx]
            self._run(rows, offs, [requests[i][1] for i in idx], prefix_cache, prefix_lp, results, idx)
            bar.update(len(idx))
        for b in range(0, len(one), self.batch_size):
            gs = one[b:b + self.batch_size]
            idx = [i for g in gs for i in g]
            row_of = [k for k, g in enumerate(gs) for _ in g]
            offs = [len(requests[i][0]) - p - 1 for i in idx]
            self._run([requests[g[0]][0][p:] for g in gs], offs, [requests[i][1] for i in idx], prefix_cache,
                      prefix_lp, results, idx, row_of)
            bar.update(len(idx))
        for g in shared:  # 4. a context with several continuations: the context once, then the choices
            ctx = requests[g[0]][0]
            rest = ctx[p:]
            cache = KVCache(model.config, 1, len(ctx) + max(len(requests[i][1]) for i in g), self.device, self.dtype)
            if prefix_cache is not None:
                for a, s in zip(cache.k + cache.v, prefix_cache.k + prefix_cache.v):
                    a[:, :, :p] = s[:, :, :p]
                cache.pos = p
            lp = prefix_lp
            if rest:
                h = model(torch.tensor([rest], device=self.device), cache=cache)
                lp = self._logprobs(h[0, -1:])[0]
            for b in range(0, len(g), self.batch_size):
                idx = g[b:b + self.batch_size]
                conts = [requests[i][1] for i in idx]
                self._run([c[:-1] for c in conts], [-1] * len(idx), conts, cache, lp, results, idx)
                bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]


def score_pairs(model, tok, pairs, batch_size: int = 16, truncate: str | None = None,
                progress: bool = True, where: str = "the task") -> list[Scored]:
    """The harness's `loglikelihood` on (context, continuation) strings."""
    reqs = fit_window(encode_requests(tok, pairs), model.max_positions, truncate, where)
    return Scorer(model, batch_size, progress).loglikelihood(reqs)
