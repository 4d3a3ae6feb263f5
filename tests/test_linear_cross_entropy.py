"""The fused output layer + cross-entropy against PyTorch's own F.cross_entropy on the logits."""

import pytest
import torch
import torch.nn.functional as F

from pretune import Transformer
from pretune.config.model import ModelConfig
from pretune.objectives import linear_cross_entropy as lce
from pretune.objectives.linear_cross_entropy import IGNORE
from pretune.objectives.losses import next_token_loss


@pytest.mark.parametrize("rows", [1000, 7, 1])  # one chunk, ragged chunks, a row at a time
def test_loss_and_gradients_equal_cross_entropy_on_the_logits(monkeypatch, rows):
    monkeypatch.setattr(lce, "chunk_rows", lambda vocab: rows)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, 16, generator=g, requires_grad=True)
    W_full = torch.randn(40, 16, generator=g, requires_grad=True)  # 37 real tokens, 3 padding rows
    y = torch.randint(0, 37, (3, 20), generator=g)
    y[0, :5] = IGNORE
    y[2, -3:] = IGNORE
    ref = F.cross_entropy((h @ W_full[:37].t()).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    gh_ref, gW_ref = torch.autograd.grad(ref * 3.0, (h, W_full))
    got = lce.linear_cross_entropy(h, W_full[:37], y)
    gh, gW = torch.autograd.grad(got * 3.0, (h, W_full))  # an upstream gradient other than 1
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gW, gW_ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(gW[37:], torch.zeros(3, 16))  # padding rows are not tokens


def test_next_token_loss_takes_the_fused_path_in_fp32_and_agrees_with_the_plain_one(monkeypatch):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, max_seq_len=16, n_layer=1, n_head=2, d_model=16, dropout=0.0))
    x = torch.randint(0, 50, (2, 9))
    targets = x[:, 1:].clone()
    targets[1, -2:] = IGNORE
    calls = []
    real = lce.LinearCrossEntropy.apply
    monkeypatch.setattr(lce.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    fused = next_token_loss(m, m(x[:, :-1]), targets)
    fused.backward()
    g_fused = m.wte.weight.grad.clone()
    m.zero_grad()
    plain = F.cross_entropy(m.logits(m(x[:, :-1]))[..., :50].flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    plain.backward()
    assert calls == [1]
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, m.wte.weight.grad, rtol=1e-5, atol=1e-7)  # tied: embedding + output


def test_under_fp16_autocast_the_plain_path_runs_and_under_bf16_the_fused_one(monkeypatch):
    m = Transformer(ModelConfig(vocab_size=50, max_seq_len=16, n_layer=1, n_head=2, d_model=16, dropout=0.0))
    x = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(m.logits(m(x))[..., :50].flatten(0, 1).float(), x.flatten())
        fused = next_token_loss(m, m(x), x)
    assert abs(fused.item() - plain.item()) <= 1e-5 * plain.item()
    monkeypatch.setattr(lce.LinearCrossEntropy, "apply", lambda *a: pytest.fail("fused path under fp16 autocast"))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = next_token_loss(m, m(x), x)
    assert torch.isfinite(loss)


def test_bf16_matches_autocasts_plain_cross_entropy():
    """Under bf16 autocast the fused loss runs on bf16 h and W (objectives.next_token_loss): the loss
    and both gradients are those of F.cross_entropy on autocast's bf16 logits (the reference)."""
    torch.manual_seed(0)
    N, d, V = 300, 64, 1000
    h = torch.randn(N, d, requires_grad=True)
    W = (torch.randn(V, d) * 0.1).requires_grad_()
    y = torch.randint(V, (N,))
    y[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ W.t()).float(), y, ignore_index=-100)
    ref.backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    for rows in (1 << 20, 64):  # one chunk, and five (the fp32 sum of W's gradient over chunks)
        loss = lce.LinearCrossEntropy.apply(h.to(torch.bfloat16), W.to(torch.bfloat16), y, rows)
        loss.backward()
        assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
        assert h.grad.dtype == W.grad.dtype == torch.float32
        assert (h.grad - gh).abs().max() <= 1e-2 * gh.abs().max()
        assert (W.grad - gW).abs().max() <= 1e-2 * gW.abs().max()
        h.grad = W.grad = None
