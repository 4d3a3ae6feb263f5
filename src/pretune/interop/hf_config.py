"""Hugging Face configurations: which families import (GPT-2, BERT, Llama, Mixtral, ...), a
`config.json` read as a ModelConfig and a ModelConfig written as one (the weights: hf_weights.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config.model import ModelConfig
from ..errors import PretuneError


ARCHS = {  # model_type -> family
    "bert": "bert", "gpt2": "gpt2", "openai-gpt": "openai-gpt", "llama": "llama", "mixtral": "mixtral",
}


ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


# ---- config.json <-> ModelConfig --------------------------------------------

def _need(d: dict, key: str, where: str):
    if key not in d:
        raise PretuneError(f"config.json has no '{key}'", where, "give the config.json the checkpoint was saved with")
    return d[key]


def family_of(hf: dict, where: str) -> str:
    mt = hf.get("model_type")
    if mt in ARCHS:
        return ARCHS[mt]
    archs = hf.get("architectures") or []
    for a in archs:
        for prefix, fam in (("Bert", "bert"), ("GPT2", "gpt2"), ("OpenAIGPT", "openai-gpt"), ("Llama", "llama"),
                            ("Mixtral", "mixtral")):
            if a.startswith(prefix):
                return fam
    raise PretuneError(f"unknown architecture '{mt or (archs[0] if archs else '?')}' in config.json", where,
                       f"pretune imports {', '.join(ARCHS)} checkpoints")


def _act(name: str, where: str) -> str:
    if name not in ACT_IN:
        raise PretuneError(f"activation '{name}' has no pretune equivalent", where,
                           f"pretune knows {', '.join(ACT_IN)}")
    return ACT_IN[name]


def config_from_hf(hf: dict, family: str, heads: dict, where: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json. `heads`: lm_head / nsp_head found in the weights."""
    c = _config_from_hf(hf, family, heads, where)
    return c.replace(d_ff=None) if c.d_ff == 4 * c.d_model else c  # None = 4d, as the presets write it


def _config_from_hf(hf: dict, family: str, heads: dict, where: str) -> ModelConfig:
    g = lambda k: _need(hf, k, where)  # noqa: E731
    if family == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise PretuneError(f"position_embedding_type '{hf['position_embedding_type']}' is not supported",
                               where, "only absolute (learned) positions are")
        return ModelConfig(
            name=hf.get("_name_or_path") or "bert", causal=False, vocab_size=g("vocab_size"),
            max_seq_len=g("max_position_embeddings"), n_layer=g("num_hidden_layers"),
            n_head=g("num_attention_heads"), d_model=g("hidden_size"), d_ff=g("intermediate_size"),
            norm_eps=hf.get("layer_norm_eps", 1e-12), norm_placement="post", embedding_norm=True,
            mlp=_act(hf.get("hidden_act", "gelu"), where), type_vocab_size=hf.get("type_vocab_size", 2),
            dropout=hf.get("hidden_dropout_prob", 0.1), tie_embeddings=hf.get("tie_word_embeddings", True),
            lm_head=heads["lm_head"], nsp_head=heads["nsp_head"], tokenizer="bert-uncased")
    if family in ("gpt2", "openai-gpt"):
        d = g("n_embd")
        if family == "gpt2":
            act = _act(hf.get("activation_function", "gelu_new"), where)
            ff = hf.get("n_inner") or 4 * d
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise PretuneError("GPT-2 attention scaled by the layer index is not supported", where,
                                   "import a checkpoint with scale_attn_by_inverse_layer_idx=false")
        else:
            if hf.get("afn", "gelu") != "gelu":  # OpenAI GPT's "gelu" is the tanh approximation
                raise PretuneError(f"OpenAI GPT activation '{hf['afn']}' is not supported", where,
                                   "only afn='gelu' (tanh GELU) is")
            act, ff = "gelu_tanh", 4 * d
        return ModelConfig(
            name=hf.get("_name_or_path") or family, causal=True, vocab_size=g("vocab_size"),
            max_seq_len=g("n_positions"), n_layer=g("n_layer"), n_head=g("n_head"), d_model=d, d_ff=ff,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_placement="pre" if family == "gpt2" else "post",
            mlp=act, dropout=hf.get("resid_pdrop", 0.1), tie_embeddings=hf.get("tie_word_embeddings", True),
            lm_head=heads["lm_head"], tokenizer="gpt2" if family == "gpt2" else "openai-gpt")
    # llama, mixtral
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if kind not in ("default", "linear"):
        raise PretuneError(f"rotary scaling '{kind}' is not supported", where,
                           "pretune implements plain rotary and linear position interpolation")
    factor = float(rope.get("factor", legacy.get("factor", 1.0))) if kind == "linear" else 1.0
    d, nh = g("hidden_size"), g("num_attention_heads")
    if hf.get("head_dim") not in (None, d // nh):
        raise PretuneError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads", where,
                           "pretune derives the head size from d_model / n_head")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise PretuneError("attention_bias and mlp_bias differ", where, "pretune has one `bias` switch for both")
    if hf.get("hidden_act", "silu") != "silu":
        raise PretuneError(f"Llama activation '{hf['hidden_act']}' is not supported", where, "only silu (SwiGLU) is")
    moe = {}
    if family == "mixtral":
        if hf.get("sliding_window") is not None:
            raise PretuneError(f"sliding_window={hf['sliding_window']} is not supported", where,
                               "pretune attends to the whole window; import a checkpoint with sliding_window null")
        k, L = g("num_experts_per_tok"), g("num_hidden_layers")
        # Mixtral's load-balancing loss pools all layers and divides f_i by N (not N k), so at
        # even routing it is k times one of our per-layer terms, which are summed over L layers.
        coef = float(hf.get("router_aux_loss_coef", 0.001)) * k / L
        moe = dict(n_expert=g("num_local_experts"), top_k=k, d_expert_ff=g("intermediate_size"),
                   aux_loss_coef=float(f"{coef:.12g}"))
    return ModelConfig(
        name=hf.get("_name_or_path") or family, causal=True, vocab_size=g("vocab_size"),
        max_seq_len=g("max_position_embeddings"), n_layer=g("num_hidden_layers"), n_head=nh,
        n_kv_head=hf.get("num_key_value_heads") or None, d_model=d, d_ff=g("intermediate_size"),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), norm_placement="pre", position="rotary",
        rope_theta=float(theta), rope_scaling=factor, mlp="swiglu", bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=hf.get("tie_word_embeddings", False), dropout=float(hf.get("attention_dropout", 0.0)),
        lm_head=heads["lm_head"], tokenizer="run", **moe)


# ---- the mapping: which Hugging Face architecture a config is ---------------

_FAMILIES = {
    # family: (class with head(s), base class, base prefix, requirements)
    "gpt2": ("GPT2LMHeadModel", "GPT2Model", "transformer."),
    "openai-gpt": ("OpenAIGPTLMHeadModel", "OpenAIGPTModel", "transformer."),
    "bert": ("BertForPreTraining", "BertModel", "bert."),
    "llama": ("LlamaForCausalLM", "LlamaModel", "model."),
    "mixtral": ("MixtralForCausalLM", "MixtralModel", "model."),
}


def _requirements(c: ModelConfig) -> dict[str, list[str]]:
    """For each family, what `c` would need to change to be it (empty: it is that family)."""
    mha = c.kv_heads == c.n_head
    common = [(c.n_expert == 0, "dense feed-forward layers (no mixture of experts)")]
    llama = [(c.causal, "a decoder"), (c.norm == "rmsnorm", "RMSNorm"), (c.norm_placement == "pre", "pre-LN"),
             (c.position == "rotary", "rotary positions"), (not c.embedding_norm, "no embedding norm"),
             (c.type_vocab_size == 0, "no segment embeddings")]
    learned_ln = [(c.norm == "layernorm", "LayerNorm"), (c.position == "learned", "learned positions"),
                  (c.bias, "biases"), (mha, "multi-head attention (no grouped-query)")]
    req = {
        "gpt2": common + learned_ln + [
            (c.causal, "a decoder"), (c.norm_placement == "pre", "pre-LN"), (not c.embedding_norm, "no embedding norm"),
            (c.type_vocab_size == 0, "no segment embeddings"), (c.mlp in ("gelu", "gelu_tanh"), "a GELU MLP")],
        "openai-gpt": common + learned_ln + [
            (c.causal, "a decoder"), (c.norm_placement == "post", "post-LN"), (not c.embedding_norm, "no embedding norm"),
            (c.type_vocab_size == 0, "no segment embeddings"), (c.mlp == "gelu_tanh", "a tanh-GELU MLP"),
            (c.ffn_dim == 4 * c.d_model, "d_ff = 4 d_model"), (c.tie_embeddings, "a tied output matrix")],
        "bert": common + learned_ln + [
            (not c.causal, "an encoder"), (c.norm_placement == "post", "post-LN"),
            (c.embedding_norm, "an embedding LayerNorm"), (c.type_vocab_size > 0, "segment embeddings"),
            (c.mlp in ("gelu", "gelu_tanh"), "a GELU MLP")],
        "llama": common + llama + [(c.mlp == "swiglu", "a SwiGLU MLP")],
        # What MixtralForCausalLM lacks, each named: it is the one MoE export.
        "mixtral": [(c.n_expert > 0, "a mixture of experts")] + llama + [
            (c.mlp == "swiglu", f"SwiGLU experts (not {c.mlp})"), (not c.bias, "no biases"),
            (c.top_k >= 2, "top_k >= 2 (top-1 gates differ: pretune keeps Switch's raw probability, "
                           "Mixtral's renormalised gate is 1)"),
            (c.capacity_factor is None, f"dropless routing (no capacity factor; this has {c.capacity_factor})"),
            (not c.shared_expert, "no shared expert"),
            (c.moe_every == 1, f"a routed layer in every block (not moe_every={c.moe_every})")],
    }
    return {f: [why for ok, why in r if not ok] for f, r in req.items()}


def describe(c: ModelConfig) -> str:
    parts = [f"{c.norm_placement}-LN {'decoder' if c.causal else 'encoder'} with {c.norm}",
             f"{c.position} positions", f"{c.mlp} MLP"]
    if c.n_expert:
        parts.append(f"mixture of experts ({c.n_expert}, top-{c.top_k})")
    return ", ".join(parts)


def hf_family(c: ModelConfig) -> str:
    """The Hugging Face family `c` maps to, or a one-line refusal naming what has no equivalent."""
    req = _requirements(c)
    for fam, missing in req.items():
        if not missing:
            return fam
    if c.n_expert:  # an MoE can only be Mixtral: name what Mixtral lacks, not what a dense family would need
        req = {"mixtral": req["mixtral"]}
    fam = min(req, key=lambda f: len(req[f]))
    which = "the one MoE export" if c.n_expert else "the nearest"
    raise PretuneError(f"a {describe(c)} has no Hugging Face equivalent ({_FAMILIES[fam][0]}, {which}, "
                       f"needs {', '.join(req[fam])})", None, "export it as a pretune run, or change the config")


def hf_class(c: ModelConfig, fam: str) -> str:
    if fam == "bert":
        if c.lm_head and c.nsp_head:
            return "BertForPreTraining"
        if c.lm_head:
            return "BertForMaskedLM"
        if c.nsp_head:
            return "BertForNextSentencePrediction"
        return "BertModel"
    with_head, base, _ = _FAMILIES[fam]
    return with_head if c.lm_head else base


def hf_prefix(c: ModelConfig, fam: str) -> str:
    """The base model's key prefix in the Hugging Face class `c` maps to."""
    return "" if hf_class(c, fam) == _FAMILIES[fam][1] else _FAMILIES[fam][2]


def sentence_transformers_meta(folder: Path) -> dict:
    """Pooling and normalisation a sentence-transformers folder declares (modules.json)."""
    out = {}
    try:
        mods = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return out
    for m in mods:
        t = m.get("type", "")
        if t.endswith("Pooling"):
            try:
                pc = json.loads((folder / m.get("path", "") / "config.json").read_text())
                out["pooling"] = "cls" if pc.get("pooling_mode_cls_token") else "mean"
            except (OSError, ValueError):
                out["pooling"] = "mean"
        elif t.endswith("Normalize"):
            out["normalize"] = True
    try:
        out["max_seq_length"] = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    except (OSError, ValueError, KeyError):
        pass
    return out


# ---- export -------------------------------------------------------------------

def hf_config(c: ModelConfig, fam: str, tok=None) -> dict:
    cls = hf_class(c, fam)
    base = {"architectures": [cls], "torch_dtype": "float32", "tie_word_embeddings": c.tie_embeddings}
    if fam == "bert":
        return {**base, "model_type": "bert", "vocab_size": c.vocab_size, "hidden_size": c.d_model,
                "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
                "intermediate_size": c.ffn_dim, "hidden_act": "gelu" if c.mlp == "gelu" else "gelu_new",
                "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout,
                "max_position_embeddings": c.max_seq_len, "type_vocab_size": c.type_vocab_size,
                "layer_norm_eps": c.norm_eps, "position_embedding_type": "absolute",
                "pad_token_id": (tok.pad_id if tok is not None and tok.pad_id is not None else 0)}
    if fam in ("gpt2", "openai-gpt"):
        out = {**base, "model_type": fam, "vocab_size": c.vocab_size, "n_positions": c.max_seq_len,
               "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head, "layer_norm_epsilon": c.norm_eps,
               "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout}
        if fam == "gpt2":
            out.update(n_inner=c.ffn_dim, activation_function="gelu" if c.mlp == "gelu" else "gelu_new")
            if tok is not None and tok.eos_id is not None:
                out.update(bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
        else:
            out["afn"] = "gelu"  # OpenAI GPT's "gelu" is the tanh approximation (gelu_new)
        return out
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling != 1.0:
        rope = {"rope_type": "linear", "rope_theta": c.rope_theta, "factor": c.rope_scaling}
    out = {**base, "model_type": fam, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
           "intermediate_size": c.expert_ffn_dim if fam == "mixtral" else c.ffn_dim,
           "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
           "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
           "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_parameters": rope,
           "rope_theta": c.rope_theta, "attention_dropout": c.dropout}
    if fam == "llama":
        out.update(attention_bias=c.bias, mlp_bias=c.bias)
    else:  # mixtral; the inverse of the coefficient's conversion in `_config_from_hf` (z-loss: none in Mixtral)
        out.update(num_local_experts=c.n_expert, num_experts_per_tok=c.top_k, sliding_window=None,
                   router_jitter_noise=0.0, output_router_logits=False,
                   router_aux_loss_coef=float(f"{c.aux_loss_coef * c.n_layer / c.top_k:.12g}"))
    if tok is not None:
        out.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return out


def _tokenizer_config(tok, fam: str) -> dict:
    names = {"pad_id": "pad_token", "unk_id": "unk_token", "cls_id": "cls_token", "sep_id": "sep_token",
             "mask_id": "mask_token", "bos_id": "bos_token", "eos_id": "eos_token"}
    out = {"tokenizer_class": "BertTokenizer" if fam == "bert" else "PreTrainedTokenizerFast"}
    for attr, key in names.items():
        i = getattr(tok, attr)
        if i is not None:
            out[key] = tok.id_to_token(i)
    if fam == "bert":
        out["do_lower_case"] = True
    return out
