"""A Llama-style MoE in and out of Hugging Face as `MixtralForCausalLM` (issue 7, item 5).

The reference is `transformers`' own Mixtral (router, top-k renormalised gates,
fused experts) on the same weights: the exported folder loads in it with the same
logits; a model built and saved by `transformers` imports with the same logits;
every other MoE variant is refused through the CLI in one line, exit status 2.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from pretune.cli import main
from pretune.config.model import ModelConfig
from pretune.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

MIXTRAL = dict(name="tiny-mixtral", vocab_size=1000, max_seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
               norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, rope_theta=500.0, dropout=0.0,
               n_expert=4, top_k=2, d_expert_ff=96, tokenizer="bpe-8192")


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**MIXTRAL, **kw})


def randomize(model: Transformer, seed: int) -> Transformer:
    """Every parameter away from its init, and routers spread wide enough that no token's
    top-k choice is a near-tie (a near-tie could flip between two correct implementations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if "router" in name else 0.05))
    return model.eval()


def _ids(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    return ids, mask


def _assert_same_bits(a: Transformer, b: Transformer, c: ModelConfig):
    sd0, sd1 = a.state_dict(), b.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        x, y = sd0[k], sd1[k]
        if x.shape[:1] == (c.padded_vocab_size,) and c.padded_vocab_size != c.vocab_size:
            x, y = x[:c.vocab_size], y[:c.vocab_size]  # padding rows come back as zeros
        assert torch.equal(x, y), k


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_as_mixtral_with_the_same_logits_and_reimports_bit_identical(tied, tmp_path, capsys):
    from pretune.interop import write_run
    from pretune.interop.hf_weights import load_hf_folder

    c = _cfg(tie_embeddings=tied)
    model = randomize(Transformer(c), seed=7 + tied)
    run = write_run(tmp_path / "run", model, None, {"test": "mixtral"})
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "MixtralForCausalLM" in capsys.readouterr().out

    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["MixtralForCausalLM"] and hf["model_type"] == "mixtral"
    assert (hf["num_local_experts"], hf["num_experts_per_tok"], hf["intermediate_size"]) == (4, 2, 96)
    keys = set(load_file(str(out / "model.safetensors")))
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in keys  # the released checkpoints' layout

    ref = transformers.MixtralForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    # transformers' own router on the same weights picks the same experts
    assert torch.equal(ref.model.layers[0].mlp.gate.weight, model.blocks[0].mlp.router.weight)
    ids, mask = _ids(c.vocab_size)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits
        ours = model.logits(model(ids, attention_mask=mask))[..., :c.vocab_size]
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4

    back, _, info = load_hf_folder(out)
    assert info["architecture"] == "mixtral"
    assert back.config.to_dict() == {**c.to_dict(), "name": back.config.name, "tokenizer": back.config.tokenizer,
                                     "d_ff": back.config.d_ff}  # d_ff: unused without a shared expert
    _assert_same_bits(model, back, c)


@pytest.mark.parametrize("layout", ["save_pretrained", "fused"])
def test_a_mixtral_saved_by_transformers_imports_with_the_same_logits(layout, tmp_path):
    """The other direction. transformers 5.x's save_pretrained writes the released checkpoints'
    per-expert w1/w2/w3; its modules hold the experts fused (`mlp.experts.gate_up_proj`,
    `down_proj`, router `mlp.gate`), and a file of that state dict imports as well."""
    from safetensors.torch import save_file

    from pretune.interop.hf_weights import load_hf_folder

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=500, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                                     rope_theta=1e4, initializer_range=0.2, tie_word_embeddings=False)
    ref = transformers.MixtralForCausalLM(cfg).eval()
    ref.save_pretrained(str(tmp_path / "hf"))
    if layout == "fused":
        sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
        assert "model.layers.1.mlp.experts.gate_up_proj" in sd
        save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    model, _, _ = load_hf_folder(tmp_path / "hf")
    c = model.config
    assert (c.n_expert, c.top_k, c.expert_ffn_dim, c.kv_heads, c.capacity_factor) == (4, 2, 80, 2, None)
    ids, mask = _ids(500, seed=1)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits
        ours = model.logits(model(ids, attention_mask=mask))[..., :500]
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kw, words", [
    (dict(capacity_factor=1.25), "capacity factor"),
    (dict(shared_expert=True), "shared expert"),
    (dict(top_k=1), "top-1 gates differ"),
    (dict(mlp="gelu"), "SwiGLU experts (not gelu)"),
    (dict(moe_every=2), "moe_every=2"),
    (dict(bias=True), "no biases"),
    (dict(norm="layernorm", position="learned"), "RMSNorm, rotary positions"),
])
def test_other_moe_variants_are_refused_in_one_line(kw, words, tmp_path, capsys):
    from pretune.interop import write_run

    run = write_run(tmp_path / "run", Transformer(_cfg(**kw)), None, {"test": "refusal"})
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "MixtralForCausalLM" in err and words in err, err
    assert not (tmp_path / "hf").exists()
