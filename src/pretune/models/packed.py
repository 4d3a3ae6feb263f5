"""A run's int4 inference weights as plain safetensors tensors, and the model built from them.

`pretune import gguf:FILE --weights int4` keeps a Q4 file's 4-bit blocks in the run instead of
dequantizing them to float32 (docs/interop.md). The checkpoint's model.safetensors then holds,
per module path P of the `Transformer` (the fp32 run's keys, with these suffixes):

* a block matrix in 4 bits: `P.qweight` uint8 (N, K/2), two weights a byte (input 2j in the low
  nibble, 2j + 1 in the high one), q in 0..15; `P.scales`, `P.zeros` bf16 (N, K/32): each group
  of 32 inputs is w = (q - 8) * scale + zero, the groups `torch._weight_int4pack_mm_for_cpu`
  multiplies (models/quantize.py's Int4Linear; a Q4_1 block's x = d q + m is scale = d,
  zero = m + 8 d). Portable on purpose: the CPU kernel's own packed layout is PyTorch's
  internal business, so it is rebuilt at load, one matrix at a time.
* the embedding, the output head and a matrix the 4-bit kernel cannot take: `P.weight` int8
  (N, K), `P.scales` bf16 (N,), one scale per row (a tied head is the embedding's table, stored once).
* the norms (and any bias): `P.weight` bf16.

The file's metadata is `METADATA`, so a checkpoint folder copied
away from its run still says what it holds. The model built here holds exactly what
`quantize_model(fp32 model, "int4")` holds (tests/test_gguf_int4_cli.py): no fp32 copy is made.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..runs.checkpoint import PACKED_FORMAT
from .quantize import ACT, Int4Linear, Int8Embedding, Int8Linear

METADATA = {"format": PACKED_FORMAT, "weights": "int4"}  # model.safetensors' header (runs.checkpoint.stored_weights)


def int4_tensors(prefix: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored form of a matrix in 4-bit groups (q uint8 0..15 (N, K), x = d q + m, d and m fp32
    (N, K/32)); the scale and zero as Int4Linear computes them, so the load is bit for bit the same."""
    q = q.to(torch.uint8)
    return {f"{prefix}.qweight": (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(),
            f"{prefix}.scales": d.to(ACT).contiguous(), f"{prefix}.zeros": (m + 8.0 * d).to(ACT).contiguous()}


def int8_tensors(prefix: str, q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored form of a matrix int8 per row (quantize.int8_per_channel's q and scale)."""
    return {f"{prefix}.weight": q.contiguous(), f"{prefix}.scales": scale.to(ACT).contiguous()}


def _int4_module(q2: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias) -> Int4Linear:
    q = torch.stack([q2 & 0x0F, q2 >> 4], -1).reshape(q2.shape[0], -1)  # back to (N, K)
    lin = Int4Linear(q, scales.float(), zeros.float(), bias)  # packs q; its scales_and_zeros replaced below
    lin.scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()  # (K/32, N, 2)
    return lin


def build_packed(c: ModelConfig, state: dict[str, torch.Tensor], where: str):
    """The Transformer of `c` with its modules made from `state` (this module's format), on the CPU."""
    from .transformer import Transformer

    with torch.device("meta"):
        model = Transformer(c)
    used: set[str] = set()

    def take(key: str, required: bool = True):
        if key not in state:
            if required:
                raise PretuneError(f"the int4 weights lack '{key}'", where, "import the GGUF file again")
            return None
        used.add(key)
        # a tensor of load_file lies at its offset in the file's buffer, not aligned as the int8
        # kernel's vector loads want (torch._weight_int8pack_mm crashed on one): a fresh allocation
        return state[key].clone()

    tables: dict[str, tuple] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, nn.Embedding)):
                continue
            p = f"{parent_name}.{name}" if parent_name else name
            bias = take(f"{p}.bias", False) if isinstance(child, nn.Linear) else None
            if f"{p}.qweight" in state:
                new = _int4_module(take(f"{p}.qweight"), take(f"{p}.scales"), take(f"{p}.zeros"), bias)
            else:
                if p == "lm_head" and c.tie_embeddings and f"{p}.weight" not in state:
                    p = "wte"  # the tied head is the embedding's int8 table
                if p not in tables:
                    tables[p] = (take(f"{p}.weight"), take(f"{p}.scales"))
                new = Int8Embedding(*tables[p]) if isinstance(child, nn.Embedding) else Int8Linear(*tables[p], bias)
            setattr(parent, name, new)
    for n, prm in list(model.named_parameters()):  # the norms: bf16, as quantize_model leaves them
        if prm.is_meta:
            mod_name, _, attr = n.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, nn.Parameter(take(n).to(ACT), requires_grad=False))
    if model.position.attribute:  # tables computed from the config (rotary), not stored
        setattr(model, model.position.attribute, model.position.build(c))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    extra = sorted(set(state) - used)
    if left or extra:
        what = f"missing {left[0]}" if left else f"unexpected {extra[0]}"
        raise PretuneError(f"the int4 weights do not fit the model ({what})",
                           where, "the checkpoint was written by a different model config")
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.weights_kind = "int4"
    return model.eval()


def load_packed(c: ModelConfig, ckpt: str | Path):
    """The int4 Transformer of a checkpoint folder in this format (its header checked first), read
    one tensor at a time (safe_open), so the load holds the packs and one tensor in flight."""
    from safetensors import SafetensorError, safe_open

    from ..safety import check_safetensors

    f = Path(ckpt) / "model.safetensors"
    check_safetensors(f)
    try:
        with safe_open(str(f), "pt") as s:
            return build_packed(c, _Lazy(s), str(ckpt))
    except (SafetensorError, OSError) as e:
        raise PretuneError(f"cannot read {f.name}: {e}", str(f), "the file is damaged") from e


class _Lazy(dict):
    """The names of a safe_open file, each tensor read when taken."""

    def __init__(self, handle):
        super().__init__((k, None) for k in handle.keys())
        self._h = handle

    def __getitem__(self, key):
        return self._h.get_tensor(key)
