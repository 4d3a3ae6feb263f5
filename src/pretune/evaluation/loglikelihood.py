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


def _new_cache(c, rows: int, length: int, device, dtype) -> KVCache:
    """An uninitialised cache (KVCache zero-fills it; here every slot read is written first)."""
    new = KVCache.__new__(KVCache)
    shape = (rows, c.kv_heads, length, c.head_dim)
    new.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
    new.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
    new.pos, new.length = 0, length
    return new


def _gather(cache: KVCache | None, c, rows: list[int], n: int, length: int, device, dtype) -> KVCache:
    """A cache whose row i holds the first `n` slots of `cache`'s row rows[i], with room for
    `length` slots (the K/V of a context expanded to the rows that continue it)."""
    new = _new_cache(c, len(rows), length, device, dtype)
    if cache is not None and n:
        idx = torch.tensor(rows, device=device)
        for a, b in zip(new.k + new.v, cache.k + cache.v):
            a[:, :, :n] = b[:, :, :n].index_select(0, idx)
    new.pos = n
    return new


class Scorer:
    """Sums log P(continuation | context) over token requests for a decoder `model`.

    A batch is limited by new tokens, not rows: at most batch_size x the longest request's
    length (what a full-sequence scorer such as the harness's forwards per batch) and at most
    4 x batch_size rows; its K/V memory stays below that scorer's logits (rows x tokens x vocab)."""

    def __init__(self, model, batch_size: int = 16, progress: bool = True, logit_chunk: int = 2048):
        if not model.config.causal:
            raise PretuneError("log-likelihood scoring needs a decoder (causal) model", None,
                               "use an encoder's MLM head with a cloze pattern (--tasks ... on a prompted task)")
        self.model, self.batch_size, self.progress, self.logit_chunk = model.eval(), batch_size, progress, logit_chunk
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.V = model.config.vocab_size
        self.budget = batch_size

    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """log-softmax over the real vocabulary for hidden states (N, d), in float32, in chunks."""
        out = [self.model.logits(h[i:i + self.logit_chunk])[..., :self.V].float().log_softmax(-1)
               for i in range(0, h.shape[0], self.logit_chunk)]
        return torch.cat(out) if out else h.new_zeros(0, self.V)

    def _batches(self, items, width):
        """Consecutive chunks of `items` (sorted widest first) within the token and row limits; a
        row shorter than 3/4 of its chunk's widest starts a new one (padding at most a quarter)."""
        out, cur, w = [], [], 0
        for it in items:
            wi = max(w, width(it), 1)
            if cur and ((len(cur) + 1) * wi > self.budget or len(cur) >= 4 * self.batch_size
                        or 4 * width(it) < 3 * wi):
                out.append(cur)
                cur, wi = [], max(width(it), 1)
            cur.append(it)
            w = wi
        return out + [cur] if cur else out

    def _cache(self, rows: list[list[int]], prefix: KVCache | None, p: int, keep: bool = False) -> KVCache | None:
        """The prefix's K/V expanded to the rows, with room for them (None: no prefix and `keep`
        not asked for, a plain forward)."""
        if prefix is None and not keep:
            return None
        return _gather(prefix, self.model.config, [0] * len(rows), p, p + max(map(len, rows), default=0),
                       self.device, self.dtype)

    def _forward(self, rows: list[list[int]], cache: KVCache | None):
        """Hidden states of right-padded `rows` continuing `cache` (None when every row is empty).
        Causal attention never looks right, so the padding needs no mask."""
        T = max(map(len, rows), default=0)
        if T == 0:
            return None
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=self.device)
        return self.model(ids, cache=cache)

    def _score(self, h, reads, results) -> None:
        """Each read (request, row, offset, continuation, first): continuation token j is predicted
        at h[row, offset + j], or for offset + j < 0 (the first token) by the log-probabilities `first`."""
        sel_r, sel_t, tgt, owner = [], [], [], []
        for k, (_, row, off, cont, _) in enumerate(reads):
            for j, t in enumerate(cont):
                if off + j >= 0:
                    sel_r.append(row), sel_t.append(off + j), tgt.append(t), owner.append(k)
        sums, greedy = [0.0] * len(reads), [True] * len(reads)
        if sel_r:
            lp = self._logprobs(h[torch.tensor(sel_r), torch.tensor(sel_t)])
            t = torch.tensor(tgt, device=lp.device)
            got = lp.gather(1, t[:, None])[:, 0].double().tolist()
            arg = (lp.argmax(-1) == t).tolist()
            for o, g, a in zip(owner, got, arg):
                sums[o] += g
                greedy[o] = greedy[o] and a
        for k, (i, _, off, cont, first) in enumerate(reads):
            if off < 0:  # the first token, predicted at the context's last position
                sums[k] += float(first[cont[0]])
                greedy[k] = greedy[k] and int(first.argmax()) == cont[0]
            results[i] = Scored(sums[k], greedy[k], len(cont))

    def _last(self, h, rows, fallback) -> list:
        """The log-probabilities at each row's last token (`fallback`, the prefix's, for an empty row)."""
        at = [(k, len(r) - 1) for k, r in enumerate(rows) if r]
        lp = self._logprobs(h[torch.tensor([a for a, _ in at]), torch.tensor([b for _, b in at])]) if at else None
        out, n = [], 0
        for r in rows:
            out.append(lp[n] if r else fallback)
            n += bool(r)
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """One `Scored` per (context ids, continuation ids), in order. Contexts must be non-empty
        (encode_pair gives the prefix token for an empty one) and fit the window (fit_window)."""
        from tqdm import tqdm

        if not requests:
            return []
        model, R = self.model, requests
        results: list[Scored | None] = [None] * len(R)
        self.budget = self.batch_size * max(len(c) + len(x) - 1 for c, x in R)
        # 1. the prefix every context shares (the k-shot demonstrations), computed once
        p = _common_prefix([ctx for ctx, _ in R])
        p = min(p, min(len(ctx) for ctx, _ in R))
        pc, plp = None, None
        if p >= 2 and len(R) > 1:
            pc = _new_cache(model.config, 1, p, self.device, self.dtype)
            plp = self._logprobs(model(torch.tensor([R[0][0][:p]], device=self.device), cache=pc)[0, -1:])[0]
        else:
            p = 0
        rest = lambda i: R[i][0][p:]  # noqa: E731  the context after the shared prefix
        # 2. group by context: the choices of one context share its cache
        groups: dict[tuple, list[int]] = {}
        for i, (ctx, _) in enumerate(R):
            groups.setdefault(tuple(ctx), []).append(i)
        singles = sorted((g[0] for g in groups.values() if len(g) == 1), key=lambda i: -(len(R[i][0]) + len(R[i][1])))
        shared = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: -len(R[g[0]][0]))
        one = [g for g in shared if all(len(R[i][1]) == 1 for i in g)]
        multi = [g for g in shared if not all(len(R[i][1]) == 1 for i in g)]
        bar = tqdm(total=len(R), desc="scoring", unit="request", disable=not self.progress, leave=False)
        # 3. single requests: sorted by length, batched, context and continuation in one row
        for idx in self._batches(singles, lambda i: len(rest(i)) + len(R[i][1]) - 1):
            rows = [(rest(i) + R[i][1])[:-1] for i in idx]
            h = self._forward(rows, self._cache(rows, pc, p))
            self._score(h, [(i, k, len(rest(i)) - 1, R[i][1], plp) for k, i in enumerate(idx)], results)
            bar.update(len(idx))
        # 4. choices of one token each (labels, most multiple choice): one row per context, every
        # choice read at the context's last position
        for gs in self._batches(one, lambda g: len(rest(g[0]))):
            rows = [rest(g[0]) for g in gs]
            h = self._forward(rows, self._cache(rows, pc, p))
            self._score(h, [(i, k, len(rows[k]) - 1, R[i][1], plp) for k, g in enumerate(gs) for i in g], results)
            bar.update(sum(map(len, gs)))
        # 5. contexts with longer choices: the contexts batched, then each context's K/V expanded to
        # one row per choice and the right-padded choices forwarded on it; contexts of one length
        # (after sorting, neighbours) share that forward, their choices starting at one position
        for gs in self._batches(multi, lambda g: len(rest(g[0]))):
            rows = [rest(g[0]) for g in gs]
            cache = self._cache(rows, pc, p, keep=True)
            h = self._forward(rows, cache)
            if h is None:
                cache = pc
            first = self._last(h, rows, plp)
            by_len: dict[int, list[tuple[int, int]]] = {}
            for k, g in enumerate(gs):
                by_len.setdefault(len(rows[k]), []).extend((i, k) for i in g)
            for n, reqs in by_len.items():
                reqs.sort(key=lambda r: -len(R[r[0]][1]))
                for chunk in self._batches(reqs, lambda r: len(R[r[0]][1]) - 1):
                    conts = [R[i][1][:-1] for i, _ in chunk]
                    c2 = _gather(cache, model.config, [k if h is not None else 0 for _, k in chunk], p + n,
                                 p + n + max(map(len, conts)), self.device, self.dtype)
                    h2 = self._forward(conts, c2)
                    self._score(h2, [(i, j, -1, R[i][1], first[k]) for j, (i, k) in enumerate(chunk)], results)
                    bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


def score_pairs(model, tok, pairs, batch_size: int = 16, truncate: str | None = None,
                progress: bool = True, where: str = "the task") -> list[Scored]:
    """The harness's `loglikelihood` on (context, continuation) strings."""
    reqs = fit_window(encode_requests(tok, pairs), model.max_positions, truncate, where)
    return Scorer(model, batch_size, progress).loglikelihood(reqs)
