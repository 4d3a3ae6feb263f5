import pytest
import torch

from pretune import PretuneError, Transformer, count_params, preset
from pretune.config.model import ModelConfig
from pretune.config.presets import PRESETS, PUBLISHED_PARAMS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_equals_model_built_on_meta(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_params(cfg)["total"] == model.num_params()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_count_matches_published_totals(name):
    # GPT-1: Radford et al. 2018; GPT-2: the released checkpoints (124M, 355M, 774M) and the
    # paper's Table 2 for XL (1542M); GPT-3: Brown et al. 2020, Table 2.1; BERT: Devlin et al. 2019.
    got = count_params(preset(name))["total"]
    assert abs(got / PUBLISHED_PARAMS[name] - 1) < 0.02, (name, got)


def test_gpt2_small_exact_hf_count():
    # GPT2LMHeadModel("gpt2") has 124,439,808 parameters with vocab 50,257 (tied head).
    cfg = preset("gpt2", vocab_multiple=1)
    assert count_params(cfg)["total"] == 124_439_808


def test_bert_base_exact_hf_count():
    # BertModel (with pooler) for bert-base-uncased: 109,482,240 parameters; the MLM transform adds
    # 768*768+768 + 2*768 and the output bias 30,522; NSP classifier 768*2+2.
    cfg = preset("bert-base", vocab_multiple=1)
    assert count_params(cfg)["total"] == 109_482_240 + (768 * 768 + 768 + 2 * 768 + 30522) + (768 * 2 + 2)


def test_non_embedding_count_gpt2():
    # Kaplan et al.'s N excludes the token and position tables: 124,439,808 - 50,257*768 - 1,024*768
    cfg = preset("gpt2", vocab_multiple=1)
    assert count_params(cfg)["non_embedding"] == 124_439_808 - 50257 * 768 - 1024 * 768


@pytest.mark.parametrize("kw,needle", [
    (dict(d_model=100, n_head=3), "not divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_kv_head=5), "n_kv_head"),
    (dict(norm="batchnorm"), "norm"),
    (dict(n_expert=4, top_k=5), "top_k"),
    (dict(n_expert=4, capacity_factor=0.0), "capacity_factor"),
    (dict(dropout=1.5), "dropout"),
])
def test_impossible_configs_are_one_clear_error(kw, needle):
    with pytest.raises(PretuneError, match=needle) as e:
        ModelConfig(**kw)
    assert "\n" not in str(e.value)


def test_unknown_preset_suggests_nearest():
    with pytest.raises(PretuneError, match="gpt2-medium"):
        preset("gpt2-medum")
