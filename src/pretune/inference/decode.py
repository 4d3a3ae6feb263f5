"""One decoding step (one new token per row, after a prefill) with as few PyTorch calls as possible.

At batch 1 a step's arithmetic is the weight matrices' products; everything else is bookkeeping
whose cost is the number of calls, not their size: the GPT-2-small shape under int8 weights spent
4.7 of 14.3 ms a token outside `_weight_int8pack_mm` (2 threads, a quiet machine), about 60
PyTorch calls a layer plus 12 `nn.Module.__call__`s, each a few microseconds. `Transformer.forward`
is general (masks, padding, chunks after a prefix, experts, biases of position kinds); this step is
the decoder's pre-LN block for exactly one new position, in 2-D (rows, d): the same operations in
the same dtypes, in about half the calls and none through `nn.Module.__call__`:

    h = W_e[u] + W_p[pos];  per block: h += proj(attn(LN1 h));  h += MLP(LN2 h);  logits = LN_f(h) W_e^T

`decoder_step(model)` returns the step, or None where the model is not that shape (post-LN,
routed experts, a position kind with a score bias, an encoder): generation then calls the model.
Each matrix product goes straight to its kernel (`quantize.Int8Linear` / `Int4Linear`'s, or
`F.linear`); another module (an adapter wrapper) is called as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import positions
from ..models.quantize import GROUP, Int4Linear, Int8Linear

ENABLED = True  # generate() uses the step; benchmarks/int8_cap.py turns it off for its A/B


def _product(m: nn.Module):
    """x (rows, in) -> (rows, out) for one matrix, bypassing nn.Module.__call__ (and the int8/int4
    modules' reshapes, casts and contiguity checks: the step's activations are already 2-D, in the
    modules' dtype, contiguous)."""
    if type(m) is Int8Linear and m.in_features % 16 == 0:  # the kernel's own condition (quantize.py)
        w, s, b = m.weight, m.scales, m.bias
        if b is None:
            return lambda x: torch._weight_int8pack_mm(x, w, s)
        return lambda x: torch._weight_int8pack_mm(x, w, s).add_(b)
    if type(m) is Int4Linear:
        w, sz, b = m.weight, m.scales_and_zeros, m.bias
        if b is None:
            return lambda x: torch._weight_int4pack_mm_for_cpu(x, w, GROUP, sz)
        return lambda x: torch._weight_int4pack_mm_for_cpu(x, w, GROUP, sz).add_(b)
    if type(m) is nn.Linear:  # the Parameter itself: gemv_layout swaps its .data, not the object
        w, b = m.weight, m.bias
        return lambda x: F.linear(x, w, b)
    return m


def _norm(m: nn.Module):
    if type(m) is nn.LayerNorm:
        shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    if type(m) is nn.RMSNorm:
        shape, w, eps = m.normalized_shape, m.weight, m.eps
        return lambda x: F.rms_norm(x, shape, w, eps)
    return m


def supports(model: nn.Module) -> bool:
    """Whether the step below computes what `model.forward` does for one new position."""
    c = getattr(model, "config", None)
    if c is None or not c.causal or c.norm_placement != "pre" or model.norm_f is None or model.lm_head is None:
        return False
    if getattr(model, "wse", None) is not None or any(b.routed for b in model.blocks):
        return False
    kind = model.position
    return kind.bias is positions.Position.bias and kind.embed in (positions.Position.embed,
                                                                   positions.Learned.embed)


def decoder_step(model: nn.Module):
    """step(idx (B, 1) long, cache) -> next-token logits (B, padded vocab), advancing `cache.pos` by
    one; or None when `supports(model)` is false. Build it once per generation (it binds the model's
    current modules: call it after quantizing and inside `gemv_layout`)."""
    if not supports(model):
        return None
    c = model.config
    H, KV, hd = c.n_head, c.kv_heads, c.head_dim
    split = [H * hd, KV * hd, KV * hd]
    gqa = KV != H
    wte = model.wte
    wpe = model.wpe if model.position.embed is positions.Learned.embed else None  # nn.Embedding or Int8Embedding
    emb_norm = _norm(model.emb_norm) if model.emb_norm is not None else None
    rotate = model._rotate if model.position.rotates() else None
    layers = []
    for blk in model.blocks:
        mlp = blk.mlp
        layers.append((_norm(blk.norm1), _product(blk.attn.qkv), _product(blk.attn.proj), _norm(blk.norm2),
                       _product(mlp.fc), mlp.act, _product(mlp.proj), mlp.glu))
    norm_f, head = _norm(model.norm_f), _product(model.lm_head)
    if type(wte) is nn.Embedding:
        embed = lambda idx: F.embedding(idx[:, 0], wte.weight)  # noqa: E731
    else:  # quantize.Int8Embedding
        embed = lambda idx: wte.forward(idx[:, 0])  # noqa: E731
    arange = torch.arange(model.max_positions)

    def step(idx: torch.Tensor, cache) -> torch.Tensor:
        B, p = idx.shape[0], cache.pos
        h = embed(idx)  # (B, d)
        pos = arange[p:p + 1]
        if wpe is not None:
            h = h + (wpe.weight[p] if type(wpe) is nn.Embedding else wpe.forward(pos))
        if emb_norm is not None:
            h = emb_norm(h)
        for i, (n1, qkv, proj, n2, fc, act, down, glu) in enumerate(layers):
            q, k, v = qkv(n1(h)).split(split, -1)
            q, k, v = q.view(B, H, 1, hd), k.view(B, KV, 1, hd), v.view(B, KV, 1, hd)
            if rotate is not None:
                q, k = rotate(q, k, pos)
            K, V = cache.k[i], cache.v[i]
            K[:, :, p:p + 1] = k
            V[:, :, p:p + 1] = v
            y = F.scaled_dot_product_attention(q.to(K.dtype), K[:, :, :p + 1], V[:, :, :p + 1], enable_gqa=gqa)
            h = h + proj(y.view(B, H * hd).to(h.dtype))
            u = fc(n2(h))
            if glu:
                gate, up = u.chunk(2, -1)
                u = F.silu(gate) * up
            else:
                u = act(u)
            h = h + down(u)
        cache.pos = p + 1
        return head(norm_f(h))

    return step
