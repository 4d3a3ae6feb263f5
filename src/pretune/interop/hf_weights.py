"""Hugging Face folders (config.json + model.safetensors) in and out of the one `Transformer`.

Four Hugging Face architectures are exactly a `ModelConfig`:

    BERT        encoder, post-LN, learned positions, segments, embedding LayerNorm, exact GELU
    GPT-2       decoder, pre-LN, learned positions, tanh GELU, Conv1D weights (stored transposed)
    OpenAI GPT  decoder, post-LN, learned positions, tanh GELU, Conv1D weights, d_ff = 4d
    Llama       decoder, pre-LN RMSNorm, rotary (half-split), SwiGLU, grouped-query attention
    Mixtral     Llama with a routed SwiGLU MoE in every block: top-k >= 2, dropless, no biases,
                no shared expert (the gates of `pretune.models.moe` for k > 1 are Mixtral's)

Each parameter of ours is one `Rule`: the Hugging Face tensors it is made of and
how (copied, concatenated along the output rows, transposed, or padded to the
padded vocabulary). Import applies the rules forward, export backwards; both are
exact (cat/split/transpose/slice), so importing an export gives the same bits.
`transformers` is never imported here: the files are read and written directly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..safety import PICKLE_SUFFIXES, check_safetensors, contained
from .hf_config import (_FAMILIES, _tokenizer_config, config_from_hf, family_of, hf_config, hf_family, hf_prefix,
                        sentence_transformers_meta)


@dataclass
class Rule:
    ours: str
    theirs: tuple[str, ...]
    # copy | cat (rows) | T (Conv1D transpose) | vocab (pad rows to padded_vocab_size)
    # | experts (theirs: per expert, its parts in order; each expert's parts cat by rows, the experts stacked)
    kind: str = "copy"
    sizes: tuple[int, ...] = ()  # the row counts of each part, for `cat` (for `experts`: of one expert's parts)


# ---- the rules ------------------------------------------------------------------

def rules(c: ModelConfig, fam: str, p: str) -> list[Rule]:
    """Our parameter <- Hugging Face tensors, for every parameter of a `Transformer(c)` (tied ones once)."""
    d, hd = c.d_model, c.head_dim
    qkv_sizes = (c.n_head * hd, c.kv_heads * hd, c.kv_heads * hd)
    wb = ("weight", "bias") if c.bias else ("weight",)
    nb = ("weight", "bias") if (c.norm == "layernorm" and c.bias) else ("weight",)
    R: list[Rule] = []

    def lin(ours, theirs, suffixes=wb, kind="copy"):
        for s in suffixes:
            R.append(Rule(f"{ours}.{s}", (f"{theirs}.{s}",), kind if s == "weight" else "copy"))

    if fam == "bert":
        R.append(Rule("wte.weight", (f"{p}embeddings.word_embeddings.weight",), "vocab"))
        R.append(Rule("wpe.weight", (f"{p}embeddings.position_embeddings.weight",)))
        R.append(Rule("wse.weight", (f"{p}embeddings.token_type_embeddings.weight",)))
        lin("emb_norm", f"{p}embeddings.LayerNorm", nb)
        for i in range(c.n_layer):
            o, t = f"blocks.{i}", f"{p}encoder.layer.{i}"
            for s in wb:
                R.append(Rule(f"{o}.attn.qkv.{s}", tuple(f"{t}.attention.self.{n}.{s}" for n in ("query", "key", "value")),
                              "cat", qkv_sizes))
            lin(f"{o}.attn.proj", f"{t}.attention.output.dense")
            lin(f"{o}.norm1", f"{t}.attention.output.LayerNorm", nb)
            lin(f"{o}.mlp.fc", f"{t}.intermediate.dense")
            lin(f"{o}.mlp.proj", f"{t}.output.dense")
            lin(f"{o}.norm2", f"{t}.output.LayerNorm", nb)
        if c.lm_head:
            lin("lm_head.dense", "cls.predictions.transform.dense", ("weight", "bias"))
            lin("lm_head.norm", "cls.predictions.transform.LayerNorm", nb)
            R.append(Rule("lm_head.bias", ("cls.predictions.bias",), "vocab"))
            if not c.tie_embeddings:
                R.append(Rule("lm_head.decoder.weight", ("cls.predictions.decoder.weight",), "vocab"))
        if c.nsp_head:
            lin("nsp_head.pooler.dense", f"{p}pooler.dense", ("weight", "bias"))
            lin("nsp_head.classifier", "cls.seq_relationship", ("weight", "bias"))
        return R
    if fam in ("gpt2", "openai-gpt"):
        gpt2 = fam == "gpt2"
        R.append(Rule("wte.weight", (f"{p}{'wte' if gpt2 else 'tokens_embed'}.weight",), "vocab"))
        R.append(Rule("wpe.weight", (f"{p}{'wpe' if gpt2 else 'positions_embed'}.weight",)))
        for i in range(c.n_layer):
            o, t = f"blocks.{i}", f"{p}h.{i}"
            lin(f"{o}.norm1", f"{t}.ln_1", nb)
            lin(f"{o}.attn.qkv", f"{t}.attn.c_attn", kind="T")  # Conv1D: (in, out)
            lin(f"{o}.attn.proj", f"{t}.attn.c_proj", kind="T")
            lin(f"{o}.norm2", f"{t}.ln_2", nb)
            lin(f"{o}.mlp.fc", f"{t}.mlp.c_fc", kind="T")
            lin(f"{o}.mlp.proj", f"{t}.mlp.c_proj", kind="T")
        if gpt2:
            lin("norm_f", f"{p}ln_f", nb)
        if c.lm_head and not c.tie_embeddings:
            R.append(Rule("lm_head.weight", ("lm_head.weight",), "vocab"))
        return R
    # llama, mixtral
    R.append(Rule("wte.weight", (f"{p}embed_tokens.weight",), "vocab"))
    for i in range(c.n_layer):
        o, t = f"blocks.{i}", f"{p}layers.{i}"
        lin(f"{o}.norm1", f"{t}.input_layernorm", nb)
        for s in wb:
            R.append(Rule(f"{o}.attn.qkv.{s}", tuple(f"{t}.self_attn.{n}_proj.{s}" for n in "qkv"), "cat", qkv_sizes))
        lin(f"{o}.attn.proj", f"{t}.self_attn.o_proj")
        lin(f"{o}.norm2", f"{t}.post_attention_layernorm", nb)
        if fam == "mixtral":  # the per-expert layout of the released checkpoints (w1 gate, w3 up, w2 down)
            m, E = f"{t}.block_sparse_moe", range(c.n_expert)
            R.append(Rule(f"{o}.mlp.router.weight", (f"{m}.gate.weight",)))
            R.append(Rule(f"{o}.mlp.fc_weight", tuple(f"{m}.experts.{e}.{w}.weight" for e in E for w in ("w1", "w3")),
                          "experts", (c.expert_ffn_dim, c.expert_ffn_dim)))
            R.append(Rule(f"{o}.mlp.proj_weight", tuple(f"{m}.experts.{e}.w2.weight" for e in E), "experts",
                          (c.d_model,)))
            continue
        for s in wb:  # SwiGLU: fc holds [gate; up]
            R.append(Rule(f"{o}.mlp.fc.{s}", (f"{t}.mlp.gate_proj.{s}", f"{t}.mlp.up_proj.{s}"), "cat",
                          (c.ffn_dim, c.ffn_dim)))
        lin(f"{o}.mlp.proj", f"{t}.mlp.down_proj")
    lin("norm_f", f"{p}norm", nb)
    if c.lm_head and not c.tie_embeddings:
        R.append(Rule("lm_head.weight", ("lm_head.weight",), "vocab"))
    return R


def _ignorable(fam: str, p: str, c: ModelConfig) -> list[re.Pattern]:
    """Tensors that carry nothing the model needs: listed as ignored, never refused."""
    pats = [r"(.*\.)?position_ids", r".*rotary_emb\.inv_freq", r".*\.attn\.(masked_)?bias"]
    if fam == "bert" and not c.nsp_head:
        pats.append(re.escape(p) + r"pooler\.dense\.(weight|bias)")  # an unused pooler (e.g. MiniLM)
    return [re.compile(x) for x in pats]


def _tied_copies(fam: str, p: str) -> dict[str, str]:
    """Hugging Face keys that are saved copies of a tied tensor: key -> the tensor it copies."""
    if fam == "bert":
        return {"cls.predictions.decoder.weight": f"{p}embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    emb = {"gpt2": "wte", "openai-gpt": "tokens_embed", "llama": "embed_tokens", "mixtral": "embed_tokens"}[fam]
    return {"lm_head.weight": f"{p}{emb}.weight"}


# ---- import -----------------------------------------------------------------

def state_from_tensors(tensors: dict[str, torch.Tensor], c: ModelConfig, fam: str, p: str,
                       where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict, the ignored keys) from Hugging Face tensors; bad input -> PretuneError naming the tensor."""
    from ..models.transformer import Transformer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(c).state_dict().items()}
    state, used = {}, set()
    for r in rules(c, fam, p):
        parts = []
        for t in r.theirs:
            if t not in tensors:
                raise PretuneError(f"missing tensor '{t}'", where, "the weights do not match config.json")
            parts.append(tensors[t].float())
            used.add(t)
        if r.kind == "experts":
            n = len(r.sizes)
            for t, x, rows in zip(r.theirs, parts, r.sizes * (len(parts) // n)):
                if x.shape[0] != rows:
                    raise PretuneError(f"tensor '{t}' has shape {list(x.shape)}, expected {rows} rows", where,
                                       "the weights do not match config.json")
            x = torch.stack([torch.cat(parts[i:i + n], 0) for i in range(0, len(parts), n)])
        elif r.kind == "cat":
            for t, x, n in zip(r.theirs, parts, r.sizes):
                if x.shape[0] != n:
                    raise PretuneError(f"tensor '{t}' has shape {list(x.shape)}, expected {n} rows", where,
                                       "the weights do not match config.json")
            x = torch.cat(parts, 0)
        elif r.kind == "T":
            x = parts[0].t()
        else:
            x = parts[0]
        if r.kind == "vocab":
            if x.shape[0] != c.vocab_size:
                raise PretuneError(f"tensor '{r.theirs[0]}' has {x.shape[0]} rows, expected vocab_size="
                                   f"{c.vocab_size}", where, "the weights do not match config.json")
            pad = c.padded_vocab_size - c.vocab_size  # padding rows: zeros, removed again on export
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], 0) if pad else x
        want = shapes[r.ours]
        if tuple(x.shape) != want:
            shown = list(parts[0].shape) if len(parts) == 1 else [list(q.shape) for q in parts]
            raise PretuneError(f"tensor '{'+'.join(r.theirs)}' has shape {shown}, the model expects {list(want)}"
                               f"{' (transposed)' if r.kind == 'T' else ''}", where,
                               "the weights do not match config.json")
        state[r.ours] = x.contiguous()
    ignored = []
    tied = _tied_copies(fam, p)
    pats = _ignorable(fam, p, c)
    for k in sorted(set(tensors) - used):
        if any(pt.fullmatch(k) for pt in pats):
            ignored.append(k)
        elif k in tied and (c.tie_embeddings or k.endswith("decoder.bias")) and tied[k] in tensors and torch.equal(
                tensors[k].float(), tensors[tied[k]].float()):
            ignored.append(k)  # a saved copy of a tied tensor
        else:
            raise PretuneError(f"unexpected tensor '{k}'", where,
                               "the weights hold a part this config.json does not describe")
    return state, ignored


def mixtral_per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 holds Mixtral's experts fused: `mlp.experts.gate_up_proj` (E, 2F, d) =
    per expert [w1; w3], `mlp.experts.down_proj` (E, d, F) = w2, the router as `mlp.gate`. Those
    keys are split here into the released per-expert layout (`block_sparse_moe.experts.{e}.w1`...),
    the one the rules name; slicing, so the bits are kept."""
    out = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(.*)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)", k)
        if not m:
            out[k] = v
            continue
        base = f"{m[1]}.block_sparse_moe"
        if m[2] == "gate.weight":
            out[f"{base}.gate.weight"] = v
        elif m[2] == "experts.down_proj":
            for e, w in enumerate(v.unbind(0)):
                out[f"{base}.experts.{e}.w2.weight"] = w
        else:
            for e, w in enumerate(v.unbind(0)):
                w1, w3 = w.chunk(2, 0)
                out[f"{base}.experts.{e}.w1.weight"], out[f"{base}.experts.{e}.w3.weight"] = w1, w3
    return out


INDEX = "model.safetensors.index.json"


def _weight_roots(folder: Path) -> list[Path]:
    """Where the weight files of `folder` may lie, links followed: the folder itself, and for a
    Hugging Face hub cache snapshot (models--X/snapshots/REV/) the repo's blobs/ folder, which
    the snapshot's files link into."""
    roots = [folder]
    if folder.resolve().parent.name == "snapshots":
        roots.append(folder.resolve().parent.parent / "blobs")
    return roots


def _inside(path: Path, folder: Path) -> bool:
    return any(contained(path, r) for r in _weight_roots(folder))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, else the shards that
    model.safetensors.index.json names, each checked to stay inside the folder. A folder with
    neither is refused; if it holds pickles (pytorch_model.bin, *.pt, *.ckpt...) the refusal says
    so, and they are never opened: they are found by their names."""
    single, index = folder / "model.safetensors", folder / INDEX
    if single.is_file():
        if not _inside(single, folder):
            raise PretuneError("model.safetensors links outside the folder", str(folder),
                               "replace the link with the file itself")
        return [single]
    if index.is_file():
        return _index_shards(folder, index)
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES | {".bin"})
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise PretuneError(f"no model.safetensors, only pickled weights ({shown}), which pretune never unpickles: "
                           "loading a pickle can run any code", str(folder),
                           "convert the weights to safetensors first, where you trust the file "
                           "(transformers: model.save_pretrained(DIR, safe_serialization=True))")
    other = [n for n in ("tf_model.h5", "flax_model.msgpack") if (folder / n).exists()]
    raise PretuneError("no model.safetensors" + (f" (only {other[0]}, which pretune does not read)" if other else ""),
                       str(folder), "convert the weights to safetensors first")


def _index_shards(folder: Path, index: Path) -> list[Path]:
    """The shard files of model.safetensors.index.json, each a plain relative name of a
    .safetensors file inside the folder (no absolute path, no `..`, no link out of it)."""
    where = str(index)
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        why = "has no weight_map" if isinstance(e, (KeyError, TypeError)) else f"is not valid JSON ({e})"
        raise PretuneError(f"{INDEX} {why}", where, "restore the file the checkpoint was saved with") from None
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise PretuneError(f"{INDEX}'s weight_map is not a mapping of tensor names to file names", where,
                           "restore the file the checkpoint was saved with")
    files = []
    for name in sorted(set(wm.values())):
        rel = Path(name)
        bad = ("is an absolute path" if rel.is_absolute() or name.startswith(("/", "\\")) else
               "climbs out of the folder (..)" if ".." in rel.parts or ".." in name.split("\\") else
               "is not a .safetensors file" if rel.suffix != ".safetensors" else
               "links outside the folder" if not _inside(folder / rel, folder) else
               "does not exist" if not (folder / rel).is_file() else None)
        if bad:
            raise PretuneError(f"the shard '{name}' named in {INDEX} {bad}", where,
                               "give the shards as file names inside the model folder")
        files.append(folder / rel)
    return files


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors file(s), each file's header checked first
    (`safety.check_safetensors`: a damaged or crafted one is named with what is wrong)."""
    from safetensors.torch import load_file

    files = weight_files(folder)
    index = None
    if len(files) > 1 or files[0].name != "model.safetensors":
        index = json.loads((folder / INDEX).read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        header = check_safetensors(f)
        if index is not None:
            for k, v in index.items():
                if (folder / v) == f and k not in header:
                    raise PretuneError(f"{INDEX} maps tensor '{k}' to {v}, which does not hold it", str(f),
                                       "the shards do not match their index; restore them")
        dup = sorted(set(header) & set(out) - {"__metadata__"})
        if dup:
            raise PretuneError(f"tensor '{dup[0]}' is in more than one shard", str(f),
                               "the shards do not match their index; restore them")
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise PretuneError(f"cannot read {f.name}: {str(e).splitlines()[0]}", str(f),
                               "the safetensors file is damaged") from e
    return out


def _detect_heads(fam: str, keys: set[str], hf: dict) -> dict:
    if fam == "bert":
        return {"lm_head": any(k.startswith("cls.predictions.") for k in keys),
                "nsp_head": any(k.startswith("cls.seq_relationship.") for k in keys)}
    if fam in ("llama", "mixtral") and not hf.get("tie_word_embeddings", False):
        return {"lm_head": "lm_head.weight" in keys, "nsp_head": False}
    archs = hf.get("architectures") or []
    headless = bool(archs) and all(a.endswith("Model") and "LMHead" not in a and "CausalLM" not in a for a in archs)
    return {"lm_head": "lm_head.weight" in keys or not headless, "nsp_head": False}


def _prefix(fam: str, keys: set[str]) -> str:
    p = _FAMILIES[fam][2]
    return p if any(k.startswith(p) for k in keys) else ""


def load_hf_folder(folder: str | Path):
    """(model, tokenizer or None, info) from a Hugging Face folder: config.json + model.safetensors."""
    from ..models.transformer import Transformer

    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise PretuneError("no config.json", str(folder), "give a Hugging Face model folder")
    try:
        hf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise PretuneError(f"config.json is not valid JSON: {e}", str(cfg_file), "fix or replace it") from e
    fam = family_of(hf, str(cfg_file))
    tensors = read_safetensors(folder)
    if fam == "mixtral":
        tensors = mixtral_per_expert(tensors)
    keys = set(tensors)
    p = _prefix(fam, keys)
    c = config_from_hf(hf, fam, _detect_heads(fam, keys, hf), str(cfg_file))
    state, ignored = state_from_tensors(tensors, c, fam, p, str(folder))
    model = Transformer(c)
    load_state(model, state)
    tok = read_hf_tokenizer(folder)
    info = {"format": "hf", "path": str(folder.resolve()), "architecture": fam,
            "class": (hf.get("architectures") or [None])[0], "ignored": ignored,
            "dtype": str(next(v.dtype for v in tensors.values() if v.is_floating_point())).replace("torch.", "")}
    info.update(sentence_transformers_meta(folder))
    return model.eval(), tok, info


def load_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load `state` (tied tensors named once) into `model`, with every parameter accounted for."""
    full = dict(state)
    alias = {}
    seen: dict[int, str] = {}
    for name, prm in model.named_parameters(remove_duplicate=False):
        if id(prm) in seen:
            alias[name] = seen[id(prm)]
        else:
            seen[id(prm)] = name
    for name, src in alias.items():
        if src in full:
            full[name] = full[src]
    missing, unexpected = model.load_state_dict(full, strict=False)
    if missing or unexpected:  # a bug in the rules, never the user's input
        raise RuntimeError(f"mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")


def read_hf_tokenizer(folder: Path):
    """The folder's tokenizer as a pretune Tokenizer: tokenizer.json, else vocab.txt (WordPiece), else None."""
    from ..tokenizer.core import Tokenizer

    if (folder / "tokenizer.json").is_file():
        return Tokenizer.load(folder / "tokenizer.json", name=f"hf:{folder.name}")
    if (folder / "vocab.txt").is_file():
        from tokenizers import AddedToken, models
        from tokenizers import Tokenizer as HFTokenizer

        from ..tokenizer.core import BERT_SPECIALS
        from ..tokenizer.vocabularies import _bert_pipeline, _bert_template
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        tok = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(lines)}, unk_token="[UNK]"))
        _bert_pipeline(tok)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS
                                if t in tok.get_vocab()])
        _bert_template(tok)
        return Tokenizer(tok, f"hf:{folder.name}")
    return None


def tensors_for_hf(model, c: ModelConfig | None = None, prefix: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], str]:
    """(Hugging Face tensors, family): the rules run backwards; vocabulary padding removed.
    `c`: the config to map by (default the model's; e.g. without its LM head), `prefix`: the
    base model's key prefix (default: that of the class `c` maps to)."""
    c = c or model.config
    fam = hf_family(c)
    p = hf_prefix(c, fam) if prefix is None else prefix
    sd = model.state_dict()
    out = {}
    for r in rules(c, fam, p):
        x = sd[r.ours].detach().float().cpu()
        if r.kind == "vocab":
            out[r.theirs[0]] = x[:c.vocab_size].contiguous()
        elif r.kind == "T":
            out[r.theirs[0]] = x.t().contiguous()
        elif r.kind == "cat":
            for t, part in zip(r.theirs, x.split(list(r.sizes), 0)):
                out[t] = part.contiguous()
        elif r.kind == "experts":
            parts = [part for xe in x.unbind(0) for part in xe.split(list(r.sizes), 0)]
            for t, part in zip(r.theirs, parts, strict=True):
                out[t] = part.contiguous()
        else:
            out[r.theirs[0]] = x.contiguous()
    return out, fam


def export_hf(model, tok, out_dir: str | Path, source: dict | None = None) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files) atomically:
    everything goes to a temporary sibling folder, renamed into place at the end."""
    c = model.config
    tensors, fam = tensors_for_hf(model)
    cfg = hf_config(c, fam, tok)
    cfg["vocab_size"] = c.vocab_size
    return write_hf_folder(out_dir, tensors, cfg, tok, fam, source)


def write_hf_folder(out_dir, tensors: dict, cfg: dict, tok, fam, source: dict | None = None,
                    texts: dict[str, str] | None = None) -> Path:
    """A Hugging Face folder, built aside and swapped in: model.safetensors, config.json, the
    tokenizer, pretune.json (where it came from) and `texts` (e.g. a model card README.md)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..fileio import atomic_dir, atomic_write_json, atomic_write_text
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PretuneError("the output folder exists and is not empty", str(out_dir),
                           "choose a new --out, or delete the folder")
    try:
        with atomic_dir(out_dir, replace=False, what="the export folder") as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            atomic_write_json(tmp / "config.json", cfg)
            if tok is not None:
                tok.save(tmp / "tokenizer.json")
                atomic_write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok, fam))
            if source:
                atomic_write_json(tmp / "pretune.json", source)
            for name, text in (texts or {}).items():
                atomic_write_text(tmp / name, text)
    except SafetensorError as e:
        raise PretuneError(f"cannot write the export: {e}", str(out_dir), "check free space and permissions") from e
    return out_dir
