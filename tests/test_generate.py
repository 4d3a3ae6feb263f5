import pytest
import torch

from pretune import Transformer
from pretune.config.model import ModelConfig
from pretune.inference.generate import generate, sample_next


def test_top_k_and_top_p_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8); top-k 1 keeps {0}
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, None, 0.7, g) for _ in range(2000)])
    counts = torch.bincount(draws.flatten(), minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.04  # renormalised over the kept set
    assert (torch.cat([sample_next(logits, 1.0, 1, None, g) for _ in range(50)]) == 0).all()
    assert sample_next(logits, 0.0, None, None, g).item() == 0  # greedy


def test_greedy_generation_equals_argmax_without_cache():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, max_seq_len=32, n_layer=2, n_head=2, d_model=32, dropout=0.0)).eval()
    x = torch.randint(0, 50, (2, 5))
    y = generate(m, x, 10, temperature=0.0)
    ref = x
    for _ in range(10):  # the slow way: the whole sequence every step, no cache
        nxt = m.logits(m(ref))[:, -1, :50].argmax(-1, keepdim=True)
        ref = torch.cat([ref, nxt], 1)
    assert torch.equal(y, ref)


def _slow(m, x, n, temperature=0.0, seed=None):
    """n tokens the slow way: the whole sequence through the model every step, no cache;
    greedy, or a multinomial draw from softmax(logits / T) on a generator seeded once."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(n):
        logits = m.logits(m(x))[:, -1, :50]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=g)
        x = torch.cat([x, nxt], 1)
    return x


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_stops_at_the_window(temperature):
    """generate() does not slide the window: asked for 100 tokens after a 5-token prompt in an
    8-token window, it returns the 3 tokens that fit, the ones a decode without the cache
    gives (greedy, and sampled with the same seed), and stops."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, max_seq_len=8, n_layer=1, n_head=2, d_model=16, dropout=0.0)).eval()
    x = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        want = _slow(m, x, 3, temperature, seed=1)
    y = generate(m, x, 100, temperature=temperature, top_k=None, seed=1)
    assert torch.equal(y, want)
    assert torch.equal(generate(m, x, 3, temperature=temperature, top_k=None, seed=1), want)  # the same, asked exactly
    assert torch.equal(generate(m, x, 2, temperature=temperature, top_k=None, seed=1), want[:, :7])


def test_generation_leaves_the_parameters_as_they_were_and_trainable():
    """generate() re-lays out the Linear weights for fast matrix-vector products on the
    CPU (generate.gemv_layout); afterwards they must be the same Parameters, bit-identical,
    contiguous, still tied, and usable by autograd, even if generate ran under inference_mode."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, max_seq_len=32, n_layer=2, n_head=2, d_model=32, dropout=0.0))
    before = {n: (p, p.detach().clone(), p.stride()) for n, p in m.named_parameters()}
    x = torch.randint(0, 50, (1, 4))
    with torch.inference_mode():
        generate(m, x, 5, temperature=0.0)
    for n, p in m.named_parameters():
        param, values, stride = before[n]
        assert p is param and torch.equal(p, values) and p.stride() == stride and p.is_contiguous(), n
        assert not p.is_inference(), n
    assert m.lm_head.weight is m.wte.weight
    m.train()
    m.logits(m(x)).sum().backward()  # would raise if a weight had become an inference tensor
    assert all(p.grad is not None for p in m.parameters())
