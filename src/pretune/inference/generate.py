"""Using a pre-trained model: sampling with a KV cache (decoders), fill-mask (encoders)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import PretuneError
from ..models.layers import KVCache
from ..models.transformer import Transformer
from . import decode


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, V) logits. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(next_token_probs(logits, temperature, top_k, top_p), 1, generator=generator)


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution `sample_next` draws from (temperature > 0): row by row, so a batch's rows
    are each what the row alone gives (inference/batched.py draws each with its own generator)."""
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus sampling (Holtzman et al. 2020)
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits.softmax(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling options that mean nothing, before any work: a negative or non-finite
    temperature (0 is greedy), top-p outside (0, 1] (nucleus sampling keeps a set of mass p,
    Holtzman et al. 2020), a negative top-k (0 or None: all tokens), fewer than one new token."""
    import math

    where = "pretune generate"
    if not math.isfinite(temperature):
        raise PretuneError(f"--temperature {temperature} is not a number", where,
                           "use 0 for greedy decoding or a positive value, e.g. 0.8")
    if temperature < 0:
        raise PretuneError(f"--temperature {temperature} is negative", where,
                           "use 0 for greedy decoding or a positive value, e.g. 0.8")
    if top_p is not None and not 0 < top_p <= 1:
        raise PretuneError(f"--top-p {top_p} is outside (0, 1]", where, "use e.g. 0.9, or 1 to keep every token")
    if top_k is not None and top_k < 0:
        raise PretuneError(f"--top-k {top_k} is negative", where, "use e.g. 50, or 0 to keep every token")
    if max_new_tokens < 1:
        raise PretuneError(f"--max-new-tokens {max_new_tokens} must be at least 1", where, "use e.g. 100")


def generate(model: Transformer, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    """Continue each row of `prompt_ids` (B, T0): one prefill pass, then one token
    at a time against a static KV cache. Returns (B, T0 + new) ids."""
    c = model.config
    if not c.causal:
        raise PretuneError("generation needs a decoder (causal) model", None, "use fill-mask for an encoder")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    B, T0 = prompt_ids.shape
    if T0 > model.max_positions:
        raise PretuneError(f"the prompt has {T0} tokens, more than the model's window of {model.max_positions}",
                           None, "shorten the prompt")
    max_new_tokens = min(max_new_tokens, model.max_positions - T0)
    from ..models.quantize import cache_dtype

    p = next(model.parameters())
    cache = KVCache(c, B, T0 + max_new_tokens, p.device, cache_dtype(model, p.device))  # fp32 on the CPU: quantize.cache_dtype
    gen = torch.Generator(device=p.device).manual_seed(seed) if seed is not None else None
    model.eval()
    V = c.vocab_size
    out = [prompt_ids]
    done = torch.zeros(B, dtype=torch.bool, device=p.device)
    # inference_mode: no autograd bookkeeping at all, ~10% faster per token than no_grad here
    with gemv_layout(model), torch.inference_mode():
        logits = model.logits(model(prompt_ids, cache=cache)[:, -1])[:, :V]
        # each new token: the decoder step in half the PyTorch calls (decode.py), same numbers
        step = decode.decoder_step(model) if decode.ENABLED else None
        for _ in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, gen)
            if eos_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                done |= nxt[:, 0] == eos_id
            out.append(nxt)
            if eos_id is not None and bool(done.all()):
                break
            if cache.pos >= cache.length:
                break
            logits = (step(nxt, cache) if step else model.logits(model(nxt, cache=cache)[:, -1]))[:, :V]
    return torch.cat(out, 1)


@contextmanager
def gemv_layout(model: torch.nn.Module):
    """Decoding multiplies a few rows by every weight matrix: matrix-vector products,
    bound by how fast BLAS streams W. `F.linear` computes x W^T; with W (out, in)
    row-major, MKL's kernel for that streamed 8 GB/s here, and with the same values
    stored (in, out) row-major, i.e. W^T contiguous, 28 GB/s: 1.9x over a decoder's
    linears (docs/performance.md). So on the CPU, for the duration of
    generation, each `nn.Linear` weight (a tied W_e once) is re-laid out in place as
    the transpose of a contiguous (in, out) tensor: same values, same Parameter,
    no extra memory; the layout is restored on exit, so training is unaffected.
    A narrowing matrix (out < in, the MLP's d_ff -> d projection) keeps its own
    layout: there (out, in) is the faster one (gpt-mini, 17 products cycled:
    1.14-1.28 ms all re-laid out, 0.94-1.06 ms with these kept)."""
    params = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu" and m.weight.dim() == 2:
            if m.out_features < m.in_features:
                continue
            if all(m.weight is not q for q in params):
                params.append(m.weight)
    # Ordinary tensors even when called under inference_mode: these stay the parameters.
    with torch.inference_mode(False), torch.no_grad():
        for w in params:
            w.data = w.data.t().contiguous().t()
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for w in params:
                w.data = w.data.contiguous()


def _load(run: Path, weights: str = "auto"):
    from ..models.load import load_model

    model, cfg, tok = load_model(run, weights=weights)
    if tok is None:
        raise PretuneError("the run has no tokenizer.json", str(run), "re-create the run with pretrain or import")
    return model, cfg, tok


def generate_cmd(prompt: str, run: Path = Path("runs/gpt-mini"), max_new_tokens: int = 100,
                 temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, num_samples: int = 1,
                 seed: int = 1337, weights: str = "auto") -> list[str]:
    """Continue a prompt with a decoder (temperature, top-k, top-p sampling, KV cache).

    Args:
        prompt: the text to continue
        run: a run directory (pretrain, finetune or import)
        max_new_tokens: tokens to generate
        temperature: 0 = greedy; higher = more random
        top_k: sample among the k most likely tokens (0 = all)
        top_p: nucleus sampling: the smallest set of tokens with this much probability
        num_samples: independent continuations
        seed: sampling seed
        weights: auto (the run's own: int4 for a run imported with --weights int4, else fp32), fp32 (as trained), bf16, int8 (per channel) or int4 (groups of 32): docs/performance.md
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if num_samples < 1:
        raise PretuneError(f"--num-samples {num_samples} must be at least 1", "pretune generate", "use e.g. 3")
    model, cfg, tok = _load(run, weights)
    if not cfg.causal:
        raise PretuneError(f"{run} holds an encoder, which does not generate text", None,
                           "use `pretune fill-mask` with it, or a decoder run")
    ids = tok.encode(prompt)
    if not ids:
        raise PretuneError("the prompt is empty", None, "give some text to continue")
    if len(ids) >= model.max_positions:
        raise PretuneError(f"the prompt has {len(ids)} tokens; the model's window is {model.max_positions}",
                           None, "shorten the prompt")
    x = torch.tensor([ids] * num_samples)
    y = generate(model, x, max_new_tokens, temperature, top_k or None, top_p, eos_id=tok.eos_id, seed=seed)
    texts = [tok.decode(row[len(ids):].tolist()) for row in y]
    for i, t in enumerate(texts):
        if num_samples > 1:
            print(f"--- sample {i + 1}")
        print(prompt + t)
    return texts


@torch.no_grad()
def fill_mask(model: Transformer, tok, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, the top-k tokens with their probabilities."""
    if model.config.causal or model.lm_head is None:
        raise PretuneError("fill-mask needs an encoder with an MLM head", None,
                           "use a BERT run pre-trained with MLM (an imported encoder without its head cannot)")
    if tok.mask_id is None:
        raise PretuneError("the tokenizer has no [MASK] token", None, "use a BERT WordPiece tokenizer")
    V = model.config.vocab_size
    if top_k < 1:
        raise PretuneError(f"--top-k {top_k} must be at least 1", "pretune fill-mask", "use e.g. 5")
    if top_k > V:
        raise PretuneError(f"--top-k {top_k} is more than the {V:,} tokens of the vocabulary", "pretune fill-mask",
                           f"use 1 .. {V:,}")
    enc = tok.encode(text)
    ids = torch.tensor([enc])
    if ids.shape[1] > model.max_positions:
        raise PretuneError(f"the text has {ids.shape[1]} tokens; the model's window is {model.max_positions}",
                           None, "shorten it")
    where = (ids[0] == tok.mask_id).nonzero().flatten()
    if len(where) == 0:
        raise PretuneError("the text holds no [MASK]", None, 'write e.g. "Paris is the [MASK] of France."')
    model.eval()
    h = model(ids)
    probs = model.logits(h[0, where])[:, :V].float().softmax(-1)
    top = probs.topk(top_k, dim=-1)
    return [[(tok.decode([i]).strip(), float(p)) for p, i in zip(ps.tolist(), ix.tolist())]
            for ps, ix in zip(top.values, top.indices)]


def fill_mask_cmd(text: str, run: Path = Path("runs/bert-mini"), top_k: int = 5, json_out: bool = False,
                  weights: str = "auto"):
    """Fill each [MASK] in a text with an encoder's most likely tokens and their probabilities.

    Args:
        text: e.g. "Washington is the [MASK] of the US."
        run: a BERT run directory with an MLM head
        top_k: candidates per [MASK]
        json_out: print JSON instead of a table
        weights: auto (the run's own: int4 for a run imported with --weights int4, else fp32), fp32 (as trained), bf16, int8 (per channel) or int4 (groups of 32)
    """
    model, cfg, tok = _load(run, weights)
    answers = fill_mask(model, tok, text, top_k)
    if json_out:
        print(json.dumps(answers))
    else:
        for i, cands in enumerate(answers):
            print(f"[MASK] #{i + 1}: " + ", ".join(f"{w} ({p:.3f})" for w, p in cands))
    return answers
