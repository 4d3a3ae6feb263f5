"""A GGUF file's Q4_0 / Q4_1 blocks straight into int4 packs: no fp32 model on the way.

`load_gguf` dequantizes every tensor to float32 (SmolLM2-135M: 540 MB) and
`quantize_model(..., "int4")` re-finds the 4-bit groups from those floats. Here each
Q4_1 tensor's raw blocks (ggml's block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles, the low
nibbles weights 0..15 of the block, the high ones 16..31; x = d q + m) become the
(q, d, m) of models/packed.py's stored form, tensor by tensor (a Q4_0 block, fp16 d and the same
nibbles, is x = d (q - 8): m = -8 d, so the pack's zero m + 8 d is 0), so the load holds one
tensor in float32 at most (the token embedding, row chunks of it, into int8 per channel as
`quantize_model` does). A matrix in another format is dequantized alone and grouped as
`quantize_model` groups it, so the packs are those of `quantize_model(load_gguf(path), "int4")`
(tests/test_quantize.py, tests/test_gguf_int4_cli.py check them equal).

`gguf_int4_state` is what `pretune import gguf:FILE --weights int4` writes into the run (the
run then loads with `models.packed`, below interop in the layers); `load_gguf_int4` builds the
model from the same tensors in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import PretuneError
from .gguf import dequantized, gguf_tokenizer, open_gguf, unpermute

CHUNK_ROWS = 8192  # the embedding's float32 rows held at once


def _nibbles(qs: np.ndarray, rows: int, K: int) -> torch.Tensor:
    """q (rows, K) from a block's 16 bytes: low nibbles weights 0..15, high ones 16..31."""
    return torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, K))


def q4_1_blocks(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K), d (N, K/32), m (N, K/32)) fp32 from a Q4_1 tensor's raw bytes."""
    K = int(t.shape[0])  # innermost first
    raw = np.asarray(t.data).reshape(-1, K // 32, 20)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return _nibbles(raw[..., 4:], raw.shape[0], K), torch.from_numpy(d), torch.from_numpy(m)


def q4_0_blocks(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, d, m) as q4_1_blocks from a Q4_0 tensor's raw bytes (ggml-common.h block_q4_0: fp16 d,
    16 bytes of nibbles; x = d (q - 8)): m = -8 d. The min/max regrouping of quantize_model would
    not find these groups (a Q4_0 block need not reach both q = 0 and 15) and would round again."""
    K = int(t.shape[0])
    raw = np.asarray(t.data).reshape(-1, K // 32, 18)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    return _nibbles(raw[..., 2:], raw.shape[0], K), torch.from_numpy(d), torch.from_numpy(-8.0 * d)


BLOCKS = {"Q4_0": q4_0_blocks, "Q4_1": q4_1_blocks}  # the 4-bit formats kept as they are


def _groups(t, where: str):
    from ..models.quantize import int4_groups_of

    read = BLOCKS.get(t.tensor_type.name)
    return read(t) if read else int4_groups_of(dequantized(t, where))  # as quantize_model groups it


def _int8_rows(t, pad: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per channel of a (vocab, d) table plus `pad` zero rows, a chunk of rows at a time
    (the rows are independent: the same values as quantizing it whole)."""
    from gguf.quants import dequantize

    from ..models.quantize import int8_per_channel

    d = int(t.shape[0])
    rows = np.asarray(t.data).reshape(int(t.shape[1]), -1)  # one row of raw blocks (or floats) a token
    qs, ss = [], []
    for i in range(0, rows.shape[0], CHUNK_ROWS):
        w = torch.from_numpy(np.array(dequantize(rows[i:i + CHUNK_ROWS], t.tensor_type), dtype=np.float32).reshape(-1, d))
        q, s = int8_per_channel(w)
        qs.append(q)
        ss.append(s)
    if pad:
        q, s = int8_per_channel(torch.zeros(pad, d))
        qs.append(q)
        ss.append(s)
    return torch.cat(qs), torch.cat(ss)


def gguf_int4_state(path: str | Path):
    """(tensors in models/packed.py's format, ModelConfig, tokenizer, info) of a Llama GGUF file whose
    block matrices are Q4_0 or Q4_1: their blocks kept as they are, the embedding and head int8 per
    channel, the norms bf16 (quantize_model's "int4"). A file with no such block matrix is refused:
    its weights would be rounded to 4 bits here, which `--weights int4` at load does as well."""
    from ..models.packed import int4_tensors, int8_tensors
    from ..models.quantize import ACT, _int4_ok, dequantize_int4, int8_per_channel

    path = Path(path)
    where = str(path)
    reader, tensors, c = open_gguf(path)
    blocks = sorted({t.tensor_type.name for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2})
    if not set(BLOCKS) & set(blocks):
        raise PretuneError(f"import --weights int4 keeps a file's Q4_0 or Q4_1 blocks, and this file's block matrices are "
                           f"{', '.join(blocks) or 'absent'}", where,
                           "import it without --weights int4 (the verbs' --weights int4 then rounds it at load)")
    used: set[str] = set()

    def get(name: str):
        if name not in tensors:
            raise PretuneError(f"missing tensor '{name}'", where, "the file is not a complete Llama model")
        used.add(name)
        return tensors[name]

    pad = c.padded_vocab_size - c.vocab_size
    state = int8_tensors("wte", *_int8_rows(get("token_embd.weight"), pad, where))
    if not c.tie_embeddings:
        state.update(int8_tensors("lm_head", *_int8_rows(get("output.weight"), pad, where)))

    def norm(key, name):
        state[key] = dequantized(get(name), where).to(ACT)

    def linear(key, names, heads=None):
        parts = []
        for i, n in enumerate(names):
            g = _groups(get(n), where)
            parts.append(tuple(unpermute(x, heads[i]) for x in g) if heads and heads[i] else g)
        q, d, m = (torch.cat(x) for x in zip(*parts))
        probe = nn.Linear(q.shape[1], q.shape[0], bias=False, device="meta")
        if not _int4_ok(probe):  # the CPU pack's constraints; quantize_model keeps such a matrix int8
            state.update(int8_tensors(key, *int8_per_channel(dequantize_int4(q, d, m))))
        else:
            state.update(int4_tensors(key, q, d, m))

    norm("norm_f.weight", "output_norm.weight")
    for i in tqdm(range(c.n_layer), desc=f"int4 packs of {path.name}", unit="block", leave=False):
        b, o = f"blk.{i}", f"blocks.{i}"
        linear(f"{o}.attn.qkv", [f"{b}.attn_q.weight", f"{b}.attn_k.weight", f"{b}.attn_v.weight"],
               [c.n_head, c.kv_heads, None])
        linear(f"{o}.attn.proj", [f"{b}.attn_output.weight"])
        linear(f"{o}.mlp.fc", [f"{b}.ffn_gate.weight", f"{b}.ffn_up.weight"])
        linear(f"{o}.mlp.proj", [f"{b}.ffn_down.weight"])
        norm(f"{o}.norm1.weight", f"{b}.attn_norm.weight")
        norm(f"{o}.norm2.weight", f"{b}.ffn_norm.weight")
    extra = sorted(set(tensors) - used)
    if extra:
        raise PretuneError(f"unexpected tensor '{extra[0]}'", where,
                           "the file holds a part pretune's Llama mapping does not know")
    info = {"format": "gguf", "path": str(path.resolve()), "architecture": "llama", "weights": "int4",
            "quantization": sorted({t.tensor_type.name for t in reader.tensors}), "ignored": []}
    return state, c, gguf_tokenizer(reader, where), info


def load_gguf_int4(path: str | Path):
    """(model, tokenizer, info) from a Llama GGUF file, its Q4_1 block matrices int4 from the file's
    blocks, the embedding and head int8 per channel, the norms bf16 (quantize_model's "int4")."""
    from ..models.packed import build_packed

    state, c, tok, info = gguf_int4_state(path)
    return build_packed(c, state, str(path)), tok, info
