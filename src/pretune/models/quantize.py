"""Weights for inference: fp32 (as trained), bf16, weight-only int8, int4 -- chosen by `--weights`.

Decoding one token at batch 1 reads every weight matrix once, so its time is bounded by the
bytes of weights over the memory bandwidth (docs/performance.md). Smaller weights move that
bound; the arithmetic stays in bf16 (activations and the dequantized values), the accumulation
in fp32 inside PyTorch's CPU kernels:

* `bf16`: every floating-point parameter cast to bfloat16 (2 bytes a weight).
* `int8`: weight-only int8, one scale per output channel (symmetric, max|w| / 127; the LLM.int8
  / "weight-only" baseline of Dettmers et al. 2022 without the outlier split), multiplied by
  `torch._weight_int8pack_mm` with bf16 activations (with fp32 activations that kernel is slower
  than an fp32 matmul). Every matrix a token reads, the token embedding and the output head
  included: a tied W_e is one int8 table, gathered for the input and multiplied for the output.
  A block matrix already on a 4-bit grid (a Q4 GGUF's, `on_4bit_grid`) keeps its 4-bit groups.
* `int4`: the blocks' matrices in 4 bits, groups of 32 along the input dimension with a scale and
  a minimum each -- llama.cpp's Q4_1 (x = d q + m, q in 0..15; a matrix already on Q4_0's grid,
  x = d (q - 8), keeps it: m = -8 d) -- multiplied by
  `torch._weight_int4pack_mm_for_cpu`, whose groups are x = (q - 8) scale + zero, so scale = d
  and zero = m + 8 d. The min/max rounding reproduces a Q4_1 file's blocks exactly from its
  dequantized weights (tests/test_quantize.py checks it on SmolLM2's GGUF). The embedding and
  the output head are int8 per channel, as llama.cpp's Q4 files keep token_embd at 8 bits
  (SmolLM2's Q4_1 file: Q8_0).

Routed experts (moe.py) hold batched parameters, not `nn.Linear`s: they are cast to bf16 only.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn

from ..errors import PretuneError

WEIGHTS = ("fp32", "bf16", "int8", "int4")
# `--weights auto`, the verbs' default: the weights the run stores -- int4 packs for a run imported
# with `--weights int4` (models/packed.py), fp32 for every other run (trained or imported as floats)
AUTO = "auto"
GROUP = 32          # int4 group size (Q4_0 / Q4_1 blocks are 32 weights)
INNER_K_TILES = 2   # the CPU int4 pack's tiling; K must be a multiple of 16 * this
ACT = torch.bfloat16
DEQUANT_ROWS = 64   # int8: rows from which a dequantized bf16 GEMM beats the int8 kernel


def check_weights(weights: str, where: str | None = None) -> str:
    """One line for an unknown `--weights` value, naming the near one."""
    if weights not in (AUTO, *WEIGHTS):
        near = difflib.get_close_matches(str(weights), (AUTO, *WEIGHTS), n=1)
        raise PretuneError(f"unknown --weights '{weights}'" + (f" (did you mean '{near[0]}'?)" if near else ""),
                           where, f"use one of {', '.join((AUTO, *WEIGHTS))}")
    return weights


# ---- the number formats (plain functions: the tests dequantize with them) --------------------

def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale fp32 (N,)): w ~ q * scale[:, None], symmetric, max|w_row| / 127."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_groups(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 0..15 (N, K), d (N, K/group), m (N, K/group)), fp32: w ~ d q + m in each group of
    `group` inputs; d = (max - min) / 15, m = min (llama.cpp's quantize_row_q4_1_ref)."""
    w = w.detach().float()
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round((g - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(N, K), d, lo


def int4_groups_symmetric(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, d, m) as int4_groups on llama.cpp's Q4_0 grid (quantize_row_q4_0_ref): x = d (q - 8), d
    the group's value of largest magnitude over -8, so m = -8 d. A Q4_0 block need not reach both
    q = 0 and 15, so int4_groups' min/max would not find its grid; this does."""
    w = w.detach().float()
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    d = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0] / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(g * inv[..., None] + 8.0).clamp_(0, 15).to(torch.uint8)
    return q.reshape(N, K), d, -8.0 * d


def _groups_and_exact(w: torch.Tensor, group: int = GROUP):
    """(groups, exact): the first of Q4_1's and Q4_0's groups that gives w back (to fp32 rounding),
    else Q4_1's min/max groups and False. Each grid is computed once."""
    first = None
    for grid in (int4_groups, int4_groups_symmetric):
        g = grid(w, group)
        if (dequantize_int4(*g, group) - w.detach().float()).abs().amax() <= 1e-5 * float(w.detach().abs().amax()):
            return g, True
        first = first or g
    return first, False


def on_4bit_grid(w: torch.Tensor, group: int = GROUP):
    """The 4-bit groups that give w back (to fp32 rounding: the matrix came from a Q4_1 or a Q4_0
    GGUF's blocks), else None. int8 per channel would round such a matrix a second time (SmolLM2
    Q4_1: +1.09% perplexity), and so would the other grid's groups; its own hold it exactly."""
    if w.shape[1] % group:
        return None
    g, exact = _groups_and_exact(w, group)
    return g if exact else None


def int4_groups_of(w: torch.Tensor, group: int = GROUP):
    """A matrix's int4 groups: its own grid if it is on one (on_4bit_grid), else int4_groups'."""
    return _groups_and_exact(w, group)[0]


def dequantize_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    return q.float() * d.repeat_interleave(group, 1) + m.repeat_interleave(group, 1)


# ---- the modules --------------------------------------------------------------------------

def _flat(x: torch.Tensor) -> torch.Tensor:
    """(rows, K) contiguous bf16: both kernels refuse a strided A (the pooler's h[:, 0], say)."""
    return x.reshape(-1, x.shape[-1]).to(ACT).contiguous()


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel: `torch._weight_int8pack_mm`, bf16 in and out."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(ACT))
        self.register_buffer("bias", None if bias is None else bias.detach().to(ACT))

    def forward(self, x):
        a = _flat(x)
        # the kernel reads K in steps of 16 (and crashes otherwise); from 64 rows on (a prefill, an
        # evaluation batch) W dequantized to bf16 once and oneDNN's GEMM are faster (at 512 rows of
        # SmolLM2's 576 -> 1536: 17 ms against 43 ms, one thread, a loaded machine)
        if self.in_features % 16 or a.shape[0] >= DEQUANT_ROWS:
            y = torch.nn.functional.linear(a, self.weight.to(ACT) * self.scales[:, None])
        else:
            y = torch._weight_int8pack_mm(a, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4-bit groups of 32: `torch._weight_int4pack_mm_for_cpu`, bf16."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)
        self.register_buffer("weight", packed)
        # the kernel's group: (q - 8) * scale + zero, laid out (K/group, N, 2)
        sz = torch.stack([d, m + 8.0 * d], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(ACT))
        self.register_buffer("bias", None if bias is None else bias.detach().to(ACT))

    def forward(self, x):
        y = torch._weight_int4pack_mm_for_cpu(_flat(x), self.weight, GROUP, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Rows of an int8 table times their scale, in bf16: the input side of a tied W_e."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(ACT))

    def forward(self, idx):
        return self.weight[idx].to(ACT) * self.scales[idx].unsqueeze(-1)


# ---- applying a choice to a model ------------------------------------------------------------

def _int4_ok(m: nn.Linear) -> bool:
    """The CPU pack's constraints: N a multiple of 16, K of the group and of 16 * inner k tiles."""
    return m.out_features % 16 == 0 and m.in_features % (16 * INNER_K_TILES) == 0 and m.in_features % GROUP == 0


def _matrices(model: nn.Module):
    """(parent, attribute name, module) of every nn.Linear and nn.Embedding, in module order."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.Linear, nn.Embedding)):
                yield parent, name, child


def quantize_model(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """`model` (a Transformer or a Classifier, eval mode, on the CPU) with its weights in
    `weights` (WEIGHTS), in place; returned for chaining. fp32 (and auto: what it holds) leaves it
    as it is."""
    if check_weights(weights) in ("fp32", AUTO):
        return model
    model.eval()
    if weights == "bf16":
        for p in model.parameters():
            p.data = p.data.to(ACT)
        model.weights_kind = getattr(model, "body", model).weights_kind = "bf16"
        return model
    body = getattr(model, "body", model)
    tied = getattr(body, "wte", None)
    tied_w = tied.weight if isinstance(tied, nn.Embedding) else None
    done: dict[int, tuple] = {}  # id(weight) -> its int8 (q, scale): a tied W_e quantized once
    for parent, name, m in list(_matrices(model)):
        w = m.weight
        vocab = getattr(getattr(body, "config", None), "padded_vocab_size", -1)
        is_head_or_embedding = isinstance(m, nn.Embedding) or w is tied_w or getattr(m, "out_features", 0) == vocab
        if isinstance(m, nn.Embedding):
            if id(w) not in done:
                done[id(w)] = int8_per_channel(w)
            new = Int8Embedding(*done[id(w)])
        elif weights == "int4" and not is_head_or_embedding and _int4_ok(m):
            new = Int4Linear(*int4_groups_of(w), m.bias)  # a Q4 file's own grid, if it is one
        elif weights == "int8" and not is_head_or_embedding and _int4_ok(m) and (g := on_4bit_grid(w)) is not None:
            new = Int4Linear(*g, m.bias)  # already 4-bit (a Q4 GGUF's matrix): exact, where int8 re-rounds
        else:
            if id(w) not in done:
                done[id(w)] = int8_per_channel(w)
            new = Int8Linear(*done[id(w)], m.bias)
        setattr(parent, name, new)
    for p in model.parameters():  # what is left: norms, biases of the heads, position tables
        p.data = p.data.to(ACT)
    model.weights_kind = body.weights_kind = weights
    return model


def weights_of(model: nn.Module) -> str:
    """Which WEIGHTS the model holds (set by quantize_model; fp32 otherwise)."""
    return getattr(model, "weights_kind", "fp32")


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's hidden states: bf16 for every choice but fp32's own dtype."""
    if weights_of(model) != "fp32":
        return ACT
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def cache_dtype(model: nn.Module, device: torch.device | str = "cpu") -> torch.dtype:
    """The KV cache's dtype: the activations', but fp32 on the CPU under bf16 activations. PyTorch's
    CPU attention is 5-6x slower in bf16 than in fp32 without AMX (one query against 100 keys, 12
    heads of 64: 276 us against 45 us, one thread); the cache's extra bytes cost less than that
    (GPT-2-small at 100 positions: 3.7 MB more a token, 0.3 ms at 12 GB/s, against 2.8 ms saved).
    layers.Attention casts the query to the cache's dtype and the output back."""
    act = activation_dtype(model)
    return torch.float32 if act == ACT and torch.device(device).type == "cpu" else act


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds, a shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
