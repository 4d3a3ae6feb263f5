"""GGUF (llama.cpp's file format) into the one `Transformer`: Llama-style decoders.

A GGUF file holds the config as metadata (`llama.block_count`, ...), the
tokenizer as metadata too (`tokenizer.ggml.tokens` / `merges` / `token_type`),
and the tensors in GGML's names and quantisation formats. The `gguf` package
(an optional dependency: `pip install pretune[gguf]`) reads and dequantizes them.

Two things differ from a Hugging Face Llama:

* llama.cpp's converter permutes the rows of W_q and W_k of every head from
  the half-split rotary layout (rotate_half: pairs (i, i + hd/2)) to GGML's
  interleaved one (pairs (2i, 2i + 1)); `unpermute` undoes it (the inverse of
  `permute` in llama.cpp's convert_hf_to_gguf.py, as transformers' GGUF loader does).
* There is no `output.weight` when the head is tied to the token embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config.model import ModelConfig
from ..errors import PretuneError

# llama.cpp's pre-tokenizer names -> the split that goes before byte-level BPE
# (llama.cpp src/llama-vocab.cpp, the regex_exprs of each LLAMA_VOCAB_PRE_TYPE).
_GPT2_PRE = ("default", "gpt2", "gpt-2")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGML's interleaved rotary rows -> Hugging Face's half-split rows, head by head.
    Inverse of llama.cpp's `permute`: reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_REQUIRED = object()


def _field(reader, key: str, default=_REQUIRED, where: str = ""):
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise PretuneError(f"GGUF metadata '{key}' is missing", where, "the file is not a complete model")
        return default
    return f.contents()


def gguf_tokenizer(reader, where: str):
    """The byte-level BPE the metadata describes, as a pretune Tokenizer."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer.core import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model", "?", where)
    if kind != "gpt2":
        raise PretuneError(f"GGUF tokenizer model '{kind}' is not supported", where,
                           "pretune rebuilds byte-level BPE ('gpt2') tokenizers only")
    pre = _field(reader, "tokenizer.ggml.pre", "default", where)
    tokens = _field(reader, "tokenizer.ggml.tokens", _REQUIRED, where)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [], where)]
    types = _field(reader, "tokenizer.ggml.token_type", [], where)
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    if pre in _GPT2_PRE:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in _DIGITS_PRE:  # "\p{N}" first: every digit its own pre-token
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise PretuneError(f"GGUF pre-tokenizer '{pre}' is not supported", where,
                           f"known: {', '.join(_GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE)}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    if _field(reader, "tokenizer.ggml.add_bos_token", False, where):
        bos = tokens[_field(reader, "tokenizer.ggml.bos_token_id", _REQUIRED, where)]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                          special_tokens=[(bos, tokens.index(bos))])])
    return Tokenizer(tok, f"gguf:{Path(where).name}")


def open_gguf(path: str | Path):
    """(reader, {name: tensor}, ModelConfig) of a Llama-architecture GGUF file, checked; no tensor read."""
    try:
        import gguf
    except ImportError as e:
        raise PretuneError("reading GGUF files needs the 'gguf' package", str(path),
                           "pip install 'pretune[gguf]'") from e
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise PretuneError("no such GGUF file", where, "check the path")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on a bad file
        raise PretuneError(f"not a readable GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                           where, "give a .gguf model file") from e
    arch = _field(reader, "general.architecture", _REQUIRED, where)
    if arch != "llama":
        raise PretuneError(f"unknown architecture '{arch}' in the GGUF file", where,
                           "pretune imports GGUF files of the 'llama' architecture")
    m = lambda k, d=_REQUIRED: _field(reader, f"{arch}.{k}", d, where)  # noqa: E731
    d, nh = int(m("embedding_length")), int(m("attention.head_count"))
    nkv = int(m("attention.head_count_kv", nh))
    if int(m("rope.dimension_count", d // nh)) != d // nh:
        raise PretuneError("partial rotary embeddings (rope.dimension_count != head size) are not supported",
                           where, "import a model that rotates whole heads")
    scaling = m("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise PretuneError(f"rotary scaling '{scaling}' is not supported", where,
                           "pretune implements plain rotary and linear position interpolation")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise PretuneError("tensor 'rope_freqs.weight' (Llama-3 rotary frequency scaling) is not supported",
                           where, "pretune implements plain rotary and linear position interpolation")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else int(m("vocab_size"))
    tied = "output.weight" not in tensors
    c = ModelConfig(
        name=str(_field(reader, "general.name", path.stem, where)), causal=True, vocab_size=vocab,
        max_seq_len=int(m("context_length")), n_layer=int(m("block_count")), n_head=nh,
        n_kv_head=nkv if nkv != nh else None, d_model=d, d_ff=int(m("feed_forward_length")), norm="rmsnorm",
        norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)), norm_placement="pre", position="rotary",
        rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_scaling=float(m("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        mlp="swiglu", bias=False, tie_embeddings=tied, dropout=0.0, tokenizer="run")
    return reader, tensors, c


def dequantized(t, where: str) -> torch.Tensor:
    """One GGUF tensor in float32, shaped as PyTorch lists it (outermost first)."""
    from gguf.quants import dequantize

    try:
        x = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise PretuneError(f"tensor '{t.name}' has quantization type {t.tensor_type.name}, which is not "
                           f"supported", where, "re-quantize the file (e.g. Q4_K, Q8_0, F16)") from e
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGML lists dimensions innermost first
    return torch.from_numpy(np.array(x, dtype=np.float32).reshape(shape))  # a writable copy


def load_gguf(path: str | Path):
    """(model, tokenizer, info) from a Llama-architecture GGUF file, dequantized to float32."""
    from tqdm import tqdm

    from ..models.transformer import Transformer
    from .hf_weights import load_state

    path = Path(path)
    where = str(path)
    reader, tensors, c = open_gguf(path)
    nh, nkv, tied, arch = c.n_head, c.kv_heads, c.tie_embeddings, "llama"

    def get(name: str) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise PretuneError(f"missing tensor '{name}'", where, "the file is not a complete Llama model")
        used.add(name)
        return dequantized(t, where)

    used: set[str] = set()
    state = {}
    pad = c.padded_vocab_size - c.vocab_size

    def vocab_rows(x):
        return torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x

    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    bar = tqdm(total=len(tensors), desc=f"dequantizing {path.name}", unit="tensor", leave=False)
    state["wte.weight"] = vocab_rows(get(names[0]))
    state["norm_f.weight"] = get("output_norm.weight")
    if not tied:
        state["lm_head.weight"] = vocab_rows(get("output.weight"))
    bar.update(len(names))
    for i in range(c.n_layer):
        b, o = f"blk.{i}", f"blocks.{i}"
        q = unpermute(get(f"{b}.attn_q.weight"), nh)
        k = unpermute(get(f"{b}.attn_k.weight"), nkv)
        state[f"{o}.attn.qkv.weight"] = torch.cat([q, k, get(f"{b}.attn_v.weight")])
        state[f"{o}.attn.proj.weight"] = get(f"{b}.attn_output.weight")
        state[f"{o}.norm1.weight"] = get(f"{b}.attn_norm.weight")
        state[f"{o}.norm2.weight"] = get(f"{b}.ffn_norm.weight")
        state[f"{o}.mlp.fc.weight"] = torch.cat([get(f"{b}.ffn_gate.weight"), get(f"{b}.ffn_up.weight")])
        state[f"{o}.mlp.proj.weight"] = get(f"{b}.ffn_down.weight")
        bar.update(9)
    bar.close()
    extra = sorted(set(tensors) - used)
    if extra:
        raise PretuneError(f"unexpected tensor '{extra[0]}'", where,
                           "the file holds a part pretune's Llama mapping does not know")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(c).state_dict().items()}
    for k, x in state.items():
        if tuple(x.shape) != shapes[k]:
            raise PretuneError(f"tensor for '{k}' has shape {list(x.shape)}, the model expects {list(shapes[k])}",
                               where, "the tensors do not match the file's metadata")
    model = Transformer(c)
    load_state(model, state)
    tok = gguf_tokenizer(reader, where)
    qtypes = sorted({t.tensor_type.name for t in reader.tensors})
    info = {"format": "gguf", "path": str(path.resolve()), "architecture": arch, "quantization": qtypes,
            "ignored": []}
    return model.eval(), tok, info
