"""The routed feed-forward layer against independent references: a dense MLP
holding the same weights, a plain per-token loop, hand-computed losses and
hand-built routing."""

import json
import math

import pytest
import torch

from pretune import Transformer
from pretune.cli import main as cli_main
from pretune.config.model import ModelConfig
from pretune.models.counting import count_params
from pretune.models.layers import MLP
from pretune.models.moe import MoE
from pretune.objectives.registry import pretrain_loss
from pretune.objectives.masking import mlm_mask
from pretune.training.config import TrainConfig, param_groups
from pretune.training.hooks import Hook, MoEStatsHook
from pretune.training.loop import Trainer


def moe_cfg(**kw):
    base = dict(name="moe-test", vocab_size=50, max_seq_len=16, n_layer=2, n_head=2, d_model=16, d_ff=24,
                dropout=0.0, n_expert=4, top_k=2)
    return ModelConfig(**{**base, **kw})


def randomise(moe: MoE, seed=0):
    """Non-zero biases and a router with some spread, so every term of the layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return moe


# ---- a plain reference, written from the formulas ----------------------------

def gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))


def gelu_erf(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def expert_ref(kind, x, W1, b1, W2, b2):
    """One expert on one token: W2 act(W1 x + b1) + b2, or SwiGLU's silu(gate) * up."""
    h = W1 @ x + (b1 if b1 is not None else 0)
    if kind == "swiglu":
        n = h.shape[0] // 2
        gate, up = h[:n], h[n:]
        h = gate * torch.sigmoid(gate) * up
    else:
        h = gelu_tanh(h) if kind == "gelu_tanh" else gelu_erf(h)
    return W2 @ h + (b2 if b2 is not None else 0)


@torch.no_grad()
def routed_ref(moe: MoE, x, drop=frozenset()):
    """Token by token, chosen expert by chosen expert. `drop` holds (token, expert) pairs to skip."""
    c = moe.c
    xs = x.reshape(-1, c.d_model)
    out = torch.zeros_like(xs)
    for n in range(xs.shape[0]):
        logits = moe.router.weight @ xs[n]
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        chosen = sorted(range(c.n_expert), key=lambda e: -float(p[e]))[:c.top_k]
        norm = sum(p[e] for e in chosen) if c.top_k > 1 else 1.0
        for e in chosen:
            if (n, e) in drop:
                continue
            y = expert_ref(c.mlp, xs[n], moe.fc_weight[e], None if moe.fc_bias is None else moe.fc_bias[e],
                           moe.proj_weight[e], None if moe.proj_bias is None else moe.proj_bias[e])
            out[n] += p[e] / norm * y
        if moe.shared is not None:
            s = moe.shared
            out[n] += expert_ref(c.mlp, xs[n], s.fc.weight, s.fc.bias, s.proj.weight, s.proj.bias)
    return out.view_as(x)


def aux_by_hand(moe: MoE, x, real=None) -> float:
    """aux_loss_coef * Switch's balance E sum_i f_i P_i (Fedus et al. 2022, eq. 4) + z_loss_coef *
    ST-MoE's z-loss mean logsumexp(logits)^2 (Zoph et al. 2022, eq. 5), from the layer's input x
    and its router's weights, over the real tokens (`real`, True at them) only: softmax, top-k
    and the counts f_i written out."""
    c = moe.c
    xs = x.reshape(-1, x.shape[-1]).double()
    if real is not None:
        xs = xs[real.reshape(-1).bool()]
    logits = xs @ moe.router.weight.detach().double().t()
    mx = logits.max(-1, keepdim=True).values
    ex = torch.exp(logits - mx)
    p = ex / ex.sum(-1, keepdim=True)
    lse = mx.squeeze(-1) + torch.log(ex.sum(-1))
    N, E = p.shape
    counts = [0] * E
    for n in range(N):
        for e in sorted(range(E), key=lambda j: -float(p[n, j]))[:c.top_k]:
            counts[e] += 1
    balance = E * sum(counts[e] / (N * c.top_k) * float(p[:, e].mean()) for e in range(E))
    return c.aux_loss_coef * balance + c.z_loss_coef * float(lse.square().mean())


def ce_by_hand(logits, labels) -> float:
    """Mean over the labelled rows of -log softmax(logits)[label], the log-sum-exp written out."""
    z, y = logits.detach().double().reshape(-1, logits.shape[-1]), labels.flatten()
    z, y = z[y != -100], y[y != -100]
    mx = z.max(-1).values
    return float((mx + torch.log(torch.exp(z - mx[:, None]).sum(-1)) - z[torch.arange(len(y)), y]).mean())


# ---- the layer ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_expert_top1_is_the_dense_mlp(kind, bias):
    c = moe_cfg(n_expert=1, top_k=1, mlp=kind, bias=bias, d_expert_ff=24)
    dense = MLP(c, d_ff=24).double()
    moe = MoE(c).double()
    with torch.no_grad():
        moe.fc_weight[0].copy_(dense.fc.weight)
        moe.proj_weight[0].copy_(dense.proj.weight)
        if bias:
            dense.fc.bias.normal_()
            dense.proj.bias.normal_()
            moe.fc_bias[0].copy_(dense.fc.bias)
            moe.proj_bias[0].copy_(dense.proj.bias)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-12, atol=1e-12)
    assert float(moe.stats["dropped"]) == 0 and moe.stats["expert_fraction"].tolist() == [1.0]


@pytest.mark.parametrize("kw", [
    dict(n_expert=4, top_k=2, mlp="gelu_tanh"),                          # Mixtral/GShard gates
    dict(n_expert=4, top_k=1, mlp="gelu"),                               # Switch's raw top-1 gate
    dict(n_expert=8, top_k=3, mlp="swiglu", bias=False, d_expert_ff=8),  # Llama-style
    dict(n_expert=4, top_k=2, mlp="gelu_tanh", shared_expert=True, moe_every=2),
    # with a capacity no expert can overflow (cf = E), through the batched (E, C, d) path:
    dict(n_expert=8, top_k=3, mlp="swiglu", bias=False, d_expert_ff=8, capacity_factor=8.0),
    dict(n_expert=4, top_k=1, mlp="gelu", capacity_factor=4.0, shared_expert=True),
], ids=["top2-gelu", "top1-switch", "top3-swiglu", "shared", "padded-top3-swiglu", "padded-top1-shared"])
@pytest.mark.parametrize("form", ["grouped", "batched"])
def test_routed_output_matches_a_per_token_loop(kw, form):
    moe = randomise(MoE(moe_cfg(**kw)).double())
    moe.max_padding = 0.0 if form == "grouped" else math.inf  # dropless only: capacity is always batched
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), routed_ref(moe, x), rtol=1e-10, atol=1e-10)


def set_logits_router(moe: MoE):
    """A router whose logits are the first E features of the token: the test writes them."""
    E, d = moe.router.weight.shape
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = torch.eye(E)


def test_balance_and_z_loss_equal_hand_computed_values():
    # 4 tokens, 2 experts, top-1, with chosen logits (1,0), (0,1), (2,0), (2,1): experts 0, 1, 0, 0.
    # f = (3/4, 1/4). P_0 = (s(1) + s(-1) + s(2) + s(1)) / 4 with s the logistic function
    #   = (0.7310585786 + 0.2689414214 + 0.8807970780 + 0.7310585786) / 4 = 0.6529639142
    # balance = 2 * (3/4 * 0.6529639142 + 1/4 * 0.3470360858) = 1.1529639142
    # z = mean of logsumexp^2 = (1.3132616875^2 + 1.3132616875^2 + 2.1269280110^2 + 2.3132616875^2) / 4
    #   = 3.3310787297
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    x = torch.zeros(1, 4, 4, dtype=torch.float64)
    x[0, :, :2] = logits
    for a, z, want in [(1.0, 0.0, 1.1529639142), (0.0, 1.0, 3.3310787297), (0.01, 0.001, 0.0148607179)]:
        moe = MoE(moe_cfg(d_model=4, n_expert=2, top_k=1, aux_loss_coef=a, z_loss_coef=z)).double()
        set_logits_router(moe)
        moe(x)
        assert moe.aux_loss.item() == pytest.approx(want, abs=1e-9)
    assert moe.stats["expert_fraction"].tolist() == [0.75, 0.25]
    # router entropy: the mean over tokens of -sum p log p
    ent = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q))
    s = lambda t: 1 / (1 + math.exp(-t))
    assert float(moe.stats["entropy"]) == pytest.approx((2 * ent(s(1)) + ent(s(2)) + ent(s(1))) / 4, abs=1e-9)


def test_balance_is_one_when_routing_is_uniform_for_any_k():
    # every token's probabilities uniform-ish and the chosen experts spread evenly -> E * sum f P = 1
    E = 4
    logits = torch.zeros(8, E, dtype=torch.float64)
    for n in range(8):  # token n prefers experts n % 4 then (n + 1) % 4, by a hair
        logits[n, n % E] = 1e-6
        logits[n, (n + 1) % E] = 5e-7
    x = torch.zeros(1, 8, 16, dtype=torch.float64)
    x[0, :, :E] = logits
    moe = MoE(moe_cfg(n_expert=E, top_k=2, aux_loss_coef=1.0, z_loss_coef=0.0)).double()
    set_logits_router(moe)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_capacity_drops_the_overflow_in_token_order():
    # 6 tokens, 2 experts, top-1, cf = 1: C = ceil(1 * 6 * 1 / 2) = 3. Tokens 0-4 choose expert 0,
    # token 5 expert 1: tokens 3 and 4 overflow and come out zero (the residual carries them).
    moe = randomise(MoE(moe_cfg(d_model=4, n_expert=2, top_k=1, capacity_factor=1.0)).double())
    set_logits_router(moe)
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    x[0, :5, :2] = torch.tensor([2.0, -1.0])
    x[0, 5, :2] = torch.tensor([-1.0, 2.0])
    assert moe.capacity(6) == 3
    x.requires_grad_()
    y = moe(x)
    assert torch.equal(y[0, 3:5], torch.zeros(2, 4, dtype=torch.float64))
    y.sum().backward()  # a dropped token gets no gradient through the layer (only the residual's)
    assert torch.equal(x.grad[0, 3:5], torch.zeros(2, 4, dtype=torch.float64)) and x.grad[0, :3].abs().sum() > 0
    torch.testing.assert_close(y, routed_ref(moe, x, drop={(3, 0), (4, 0)}), rtol=1e-10, atol=1e-10)
    assert float(moe.stats["dropped"]) == pytest.approx(2 / 6)
    assert moe.stats["expert_fraction"].tolist() == pytest.approx([5 / 6, 1 / 6])  # before capacity


def test_capacity_serves_first_choices_before_second_choices():
    # 4 tokens, 3 experts, top-2, cf = 0.75: C = ceil(0.75 * 4 * 2 / 3) = 2.
    # Tokens 0, 1 choose (1, 0); tokens 2, 3 choose (0, 2). Expert 0 is asked 4 times: the first
    # choices of tokens 2, 3 win over the earlier tokens' second choices (GShard's priority).
    moe = randomise(MoE(moe_cfg(d_model=4, n_expert=3, top_k=2, capacity_factor=0.75)).double())
    set_logits_router(moe)
    x = torch.randn(1, 4, 4, dtype=torch.float64)
    x[0, :2, :3] = torch.tensor([1.0, 3.0, -5.0])
    x[0, 2:, :3] = torch.tensor([3.0, -5.0, 1.0])
    assert moe.capacity(4) == 2
    y = moe(x)
    torch.testing.assert_close(y, routed_ref(moe, x, drop={(0, 0), (1, 0)}), rtol=1e-10, atol=1e-10)
    assert float(moe.stats["dropped"]) == pytest.approx(2 / 8)


def test_padding_is_neither_routed_nor_counted():
    # Two rows of 4 tokens, E = 2, top-1, cf = 1. Row 0: two real tokens for expert 1 (logits (-1, 2)),
    # then two pads whose logits (3, -1) would ask for expert 0; row 1: four real tokens for expert 0
    # (logits (2, -1)). The 6 real tokens alone: C = ceil(1 * 6 * 1 / 2) = 3; expert 0 serves row 1's
    # first three and drops its fourth, expert 1 serves row 0's two. (Were the pads routed: C = 4,
    # the pads come first in token order and take two of expert 0's slots from row 1.)
    # f = (4/6, 2/6); P_0 = (4 s(3) + 2 s(-3)) / 6 = 0.6508580423 (s the logistic function)
    # balance = 2 * (4/6 * P_0 + 2/6 * P_1) = 1.1005720282
    # every real token's logsumexp is 2 + log(1 + e^-3) = 2.0485873516: z = 4.1967101370
    x = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, :2, :2] = torch.tensor([-1.0, 2.0])
    x[0, 2:, :2] = torch.tensor([3.0, -1.0])
    x[1, :, :2] = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    for a, zc, want in [(1.0, 0.0, 1.1005720282), (0.0, 1.0, 4.1967101370)]:
        moe = randomise(MoE(moe_cfg(d_model=4, n_expert=2, top_k=1, capacity_factor=1.0, aux_loss_coef=a,
                                    z_loss_coef=zc)).double())
        set_logits_router(moe)
        y = moe(x, mask)
        assert moe.aux_loss.item() == pytest.approx(want, abs=1e-9)
    assert moe.stats["expert_fraction"].tolist() == pytest.approx([4 / 6, 2 / 6])
    assert float(moe.stats["dropped"]) == pytest.approx(1 / 6)
    real = x[mask]  # row 0's two real tokens, then row 1's four: row 1's last is real token 5
    torch.testing.assert_close(y[mask], routed_ref(moe, real, drop={(5, 0)}), rtol=1e-10, atol=1e-10)
    assert not y[~mask].any()  # padding comes out zero; the residual carries it


@pytest.mark.parametrize("kw, form", [
    (dict(n_expert=4, top_k=2, mlp="gelu_tanh"), "grouped"),
    (dict(n_expert=4, top_k=2, mlp="gelu_tanh"), "batched"),
    (dict(n_expert=4, top_k=2, mlp="gelu_tanh", capacity_factor=1.0), "capacity"),
    (dict(n_expert=4, top_k=1, mlp="gelu", capacity_factor=0.75, shared_expert=True), "capacity"),
], ids=["grouped", "batched", "capacity-top2", "capacity-top1-shared"])
@pytest.mark.parametrize("pads", [3, 7], ids=["half-padded", "all-padding"])
def test_a_row_behind_padding_is_routed_as_its_real_tokens_alone(kw, form, pads):
    """Row 0 with `pads` pads, then row 1: the outputs at the real tokens, the statistics and
    the auxiliary loss are those of the real tokens alone, in order, without padding (with
    row 0 all padding: row 1 alone), whatever the pads hold."""
    moe = randomise(MoE(moe_cfg(**kw)).double())
    moe.max_padding = 0.0 if form == "grouped" else math.inf
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 7 - pads:] = False
    y, aux, stats = moe(x, mask), moe.aux_loss, dict(moe.stats)
    alone = moe(x[mask][None])[0]
    torch.testing.assert_close(y[mask], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aux, moe.aux_loss, rtol=1e-10, atol=1e-12)
    for k in stats:
        torch.testing.assert_close(stats[k], moe.stats[k], rtol=1e-10, atol=1e-12)
    assert aux.item() == pytest.approx(aux_by_hand(moe, x, mask), rel=1e-9)
    x2 = x.clone()
    x2[~mask] = 10 * torch.randn(int((~mask).sum()), 16, dtype=torch.float64)
    assert torch.equal(moe(x2, mask), y) and torch.equal(moe.aux_loss, aux)


def test_a_batch_of_padding_only_is_zero_and_costs_nothing():
    moe = randomise(MoE(moe_cfg(capacity_factor=1.0)).double())
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    y = moe(x, torch.zeros(2, 3, dtype=torch.bool))
    assert not y.any() and moe.aux_loss.item() == 0.0 and not moe.stats["expert_fraction"].any()
    (y.sum() + moe.aux_loss).backward()
    assert not x.grad.any()


@pytest.mark.parametrize("E", [3, 4], ids=["batched", "grouped"])  # padding 1.5x and 2x the work
def test_dropless_drops_nothing_however_skewed(E):
    moe = randomise(MoE(moe_cfg(d_model=4, n_expert=E, top_k=2, capacity_factor=None)).double())
    set_logits_router(moe)
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    x[0, :, :3] = torch.tensor([5.0, 4.0, -5.0])  # every token to experts 0 and 1 (3 stays at 0)
    torch.testing.assert_close(moe(x), routed_ref(moe, x), rtol=1e-10, atol=1e-10)
    assert float(moe.stats["dropped"]) == 0.0


@pytest.mark.parametrize("cf", [None, 4.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("k", [1, 2])
def test_gradients_reach_the_router_and_only_the_selected_experts(k, cf):
    moe = randomise(MoE(moe_cfg(n_expert=4, top_k=k, capacity_factor=cf)).double())
    moe.max_padding = 0.0  # dropless: the grouped form (the batched one is the capacity case)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():  # expert 3 is never chosen: a large constant feature pushes its logit down
        x[..., 0] = 4.0
        moe.router.weight[3, 0] = -10.0
    moe(x).square().sum().backward()  # the task loss alone, no aux_loss
    used = set(torch.nonzero(moe.stats["expert_fraction"]).flatten().tolist())
    assert 3 not in used and len(used) >= k
    assert moe.router.weight.grad.abs().sum() > 0
    for e in range(4):
        for p in (moe.fc_weight, moe.proj_weight, moe.fc_bias, moe.proj_bias):
            g = p.grad[e].abs().sum()
            assert (g > 0) if e in used else (g == 0), (e, p.shape)


def test_aux_loss_alone_trains_the_router():
    moe = MoE(moe_cfg(n_expert=4, top_k=2))
    moe(torch.randn(2, 5, 16))
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.fc_weight.grad is None or moe.fc_weight.grad.abs().sum() == 0


def test_router_runs_in_float32_under_bf16_autocast():
    moe = MoE(moe_cfg())
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, _, gates = moe.route(x.reshape(-1, 16))
        y = moe(x)
    assert logits.dtype == probs.dtype == gates.dtype == torch.float32
    assert y.shape == x.shape and torch.isfinite(y).all() and moe.aux_loss.dtype == torch.float32


def test_init_follows_gpt2():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(d_model=64, d_ff=256, n_layer=8, n_expert=8, n_head=4))
    assert moe.fc_weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.proj_weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert moe.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert moe.fc_bias.abs().sum() == 0 and moe.proj_bias.abs().sum() == 0


# ---- in the model ------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(),
    dict(mlp="swiglu", bias=False, shared_expert=True, norm="rmsnorm", position="rotary", n_kv_head=1),
    dict(moe_every=2, n_layer=4, d_expert_ff=12, capacity_factor=1.25, top_k=1),
    dict(causal=False, type_vocab_size=2, nsp_head=True, norm_placement="post", embedding_norm=True, n_expert=8),
])
def test_parameter_count_matches_count_params(kw):
    c = moe_cfg(**kw)
    with torch.device("meta"):
        m = Transformer(c)
    counts = count_params(c)
    assert m.num_params() == counts["total"]
    n_moe = sum(c.is_moe_block(i) for i in range(c.n_layer))
    assert sum(isinstance(b.mlp, MoE) for b in m.blocks) == n_moe
    moe = m.blocks[c.moe_every - 1].mlp  # its own tensors are the stacked experts (router, shared: submodules)
    per_expert = sum(p[0].numel() for p in moe.parameters(recurse=False))
    assert counts["total"] - counts["active"] == n_moe * (c.n_expert - c.top_k) * per_expert


def batch(causal, B=3, T=12, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, V, (B, T + 1), generator=g)
    if causal:
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    ids = x[:, :-1]
    ids[:, 0] = 1
    inp, labels = mlm_mask(ids, ids < 5, 4, V, g)
    labels[:, 1] = ids[:, 1]
    return {"input_ids": inp, "segment_ids": torch.zeros_like(ids), "labels": labels,
            "attention_mask": torch.ones_like(ids, dtype=torch.bool), "nsp_labels": torch.tensor([0, 1, 0])}


BERT = dict(causal=False, type_vocab_size=2, nsp_head=True, norm_placement="post", embedding_norm=True)


def padded_bert_batch():
    """batch(False) with row 0 ending in 4 [PAD] (id 0) tokens, as PairBatches pads."""
    b = batch(False)
    b["attention_mask"][0, 8:] = False
    b["input_ids"][0, 8:] = 0
    b["labels"][0, 8:] = -100
    return b


@pytest.mark.parametrize("causal", [True, False], ids=["gpt", "bert"])
def test_transformer_with_experts_trains_a_step(causal):
    c = moe_cfg(**({} if causal else BERT), capacity_factor=1.25, dropout=0.1)
    m = Transformer(c)
    b = batch(True) if causal else padded_bert_batch()
    seen, out = [], {}  # each routed layer's input and the final h_n, from the pass pretrain_loss makes
    for blk in m.blocks:
        blk.mlp.register_forward_pre_hook(lambda mod, a: seen.append((mod, a[0].detach())))
    m.register_forward_hook(lambda mod, a, h: out.update(h=h.detach()))
    loss, parts = pretrain_loss(m, b)
    # the routers' losses by hand, over the real tokens, and the task loss by hand from the logits
    aux = sum(aux_by_hand(mod, x, b.get("attention_mask")) for mod, x in seen)
    logits = m.logits(out["h"])[..., :c.vocab_size]
    if causal:
        task = ce_by_hand(logits, b["targets"])
    else:
        task = ce_by_hand(logits, b["labels"]) + ce_by_hand(m.nsp_head(out["h"]), b["nsp_labels"])
    assert len(seen) == c.n_layer and aux > 0
    assert parts["moe_aux"].item() == pytest.approx(aux, rel=1e-5)
    assert loss.item() == pytest.approx(task + aux, rel=1e-5)
    loss.backward()
    for name, p in m.named_parameters():
        if "mlp" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    opt.step()
    loss2, _ = pretrain_loss(m, batch(causal))
    assert torch.isfinite(loss2)


def test_an_encoder_with_experts_ignores_what_the_padding_holds():
    # Other token ids under the padding, capacity routing: the same outputs at the real tokens,
    # the same routing statistics and auxiliary loss (the pads are neither routed nor counted).
    m = Transformer(moe_cfg(**BERT, capacity_factor=1.0)).eval()
    runs = []
    for pad_ids in (0, torch.arange(7, 11)):
        b = padded_bert_batch()
        b["input_ids"][0, 8:] = pad_ids
        with torch.no_grad():
            h = m(b["input_ids"], segment_ids=b["segment_ids"], attention_mask=b["attention_mask"])
        runs.append((h[b["attention_mask"]], m.moe_losses(), [dict(blk.mlp.stats) for blk in m.blocks]))
    (h0, a0, s0), (h1, a1, s1) = runs
    torch.testing.assert_close(h0, h1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a0, a1, rtol=1e-6, atol=1e-7)
    for x, y in zip(s0, s1):
        assert all(torch.allclose(x[k], y[k], atol=1e-7) for k in x)


def test_a_decoder_with_experts_stays_causal():
    # dropless routing is per token, so changing a later token never changes an earlier output
    m = Transformer(moe_cfg()).eval()
    a = torch.randint(5, 50, (1, 10))
    b = a.clone()
    b[0, 7:] = torch.randint(5, 50, (3,))
    torch.testing.assert_close(m(a)[0, :7], m(b)[0, :7])


def test_expert_biases_get_no_weight_decay():
    m = Transformer(moe_cfg())
    decay, no_decay = param_groups(m, 0.1)
    ids = lambda g: {id(p) for p in g["params"]}
    moe = m.blocks[0].mlp
    assert {id(moe.fc_bias), id(moe.proj_bias)} <= ids(no_decay)
    assert {id(moe.fc_weight), id(moe.proj_weight), id(moe.router.weight)} <= ids(decay)


# ---- the loop: statistics, resume --------------------------------------------

class Batches:
    def __init__(self, causal):
        self.causal, self.k = causal, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.k += 1
        return batch(self.causal, seed=self.k)

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


def test_stats_are_logged_and_resume_is_bit_identical(tmp_path, causal=True):
    c = moe_cfg(capacity_factor=1.0)
    tc = dict(steps=8, batch_size=3, lr=1e-2, warmup=2, log_every=3, eval_every=0, ckpt_every=100, seed=3)

    class StopAt(Hook):
        def after_step(self, trainer, loss, parts):
            if trainer.step == 4:  # between two log lines: the hook's running sums must survive
                trainer.stop_requested = True

    def trainer(d, extra=()):
        torch.manual_seed(1)
        return Trainer(Transformer(c), TrainConfig(**tc), Batches(causal), pretrain_loss, d, progress=False,
                       hooks=[MoEStatsHook(), *extra])

    straight = trainer(tmp_path / "a")
    straight.fit()
    trainer(tmp_path / "b", [StopAt()]).fit()
    resumed = trainer(tmp_path / "b")
    resumed.fit()
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 8]
    for r in logged:
        frac = r["moe_expert_frac"]
        assert len(frac) == c.n_layer and all(len(f) == c.n_expert for f in frac)
        assert all(sum(f) == pytest.approx(1.0, abs=1e-4) for f in frac)
        assert 0 <= r["moe_dropped"] < 1 and 0 < r["moe_entropy"] <= math.log(c.n_expert) + 1e-6
        assert r["moe_imbalance"] >= 1.0 and r["moe_aux"] > 0
    keys = ("loss", "moe_entropy", "moe_dropped", "moe_expert_frac")
    assert [[r.get(k) for k in keys] for r in rows_b if "loss" in r] == [[r.get(k) for k in keys] for r in logged]
    assert (tmp_path / "a" / "moe.png").stat().st_size > 0


@pytest.mark.parametrize("args, word", [
    (["--model.n-expert", "4", "--model.top-k", "5"], "top_k"),
    (["--model.n-expert", "-1"], "n_expert"),
    (["--model.n-expert", "4", "--model.capacity-factor", "0"], "capacity_factor"),
    (["--model.n-expert", "0", "--model.capacity-factor", "1.25"], "zero experts"),
    (["--model.n-expert", "0", "--model.shared-expert"], "zero experts"),
])
def test_bad_expert_options_exit_2_with_one_line(tmp_path, capsys, args, word):
    rc = cli_main(["pretrain", "--model", "gpt-mini", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and word in err and "\n" not in err
    assert not (tmp_path / "run").exists()
