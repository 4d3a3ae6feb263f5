"""Evaluation without labels on tiny models: the KV-cache scorer against a plain full forward per
request, the harness's request split, the sliding windows against Hugging Face's perplexity-guide
loop, balanced k-shot draws, acc_norm by hand, the PET cloze pattern against a manual forward, and
`pretune evaluate --tasks` end to end (table, JSON, plot). The real-model parity (SmolLM2 against
transformers and lm-eval) is tests/test_evaluation_parity.py."""

import json
import math

import pytest
import torch

from pretune.cli import main
from pretune.config.model import ModelConfig
from pretune.models.transformer import Transformer

TEXT = [f"Document {i}. The quick brown fox jumps over the lazy dog, and the clocks were striking {i % 13}. "
        "Call me Ishmael. Some years ago, never mind how long precisely." for i in range(40)]


def _model(**kw):
    c = ModelConfig(**{**dict(name="t", vocab_size=320, max_seq_len=64, n_layer=2, n_head=4, d_model=32), **kw})
    m = Transformer(c).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def bpe():
    from pretune.tokenizer.vocabularies import train_tokenizer
    return train_tokenizer("bpe", 320, TEXT)


def _full(m, ctx, cont):
    """The reference: one plain forward of context + continuation, no cache, no batching."""
    with torch.no_grad():
        lp = m.logits(m(torch.tensor([ctx + cont])))[0, :, :m.config.vocab_size].float().log_softmax(-1)
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)), all(
        int(lp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_scorer_matches_a_full_forward_per_request(kind):
    from pretune.evaluation.loglikelihood import Scorer
    kw = dict(position="rotary", norm="rmsnorm", mlp="swiglu", norm_placement="pre") if kind == "rotary" else {}
    m = _model(**kw)
    g = torch.Generator().manual_seed(1)
    R = lambda n: torch.randint(0, 320, (n,), generator=g).tolist()  # noqa: E731
    demos = R(12)
    reqs = [(demos + R(3 + k), R(1 + ch)) for k in range(4) for ch in range(3)]  # shared prefix, 3 choices apart
    reqs = [(reqs[i - i % 3][0], reqs[i][1]) for i in range(len(reqs))]  # the choices of one context share it
    reqs += [(demos + R(5), R(4)), (demos, R(2))]  # singles; one context that is the shared prefix itself
    for k in range(3):  # one-token choices: one row per context, batched
        ctx = demos + R(2 + 2 * k)
        reqs += [(ctx, R(1)) for _ in range(2 + k)]
    reqs += [(demos, R(1)), (demos, R(1))]  # one-token choices of the prefix itself
    for bs in (1, 4):
        for (ctx, cont), s in zip(reqs, Scorer(m, batch_size=bs, progress=False).loglikelihood(reqs)):
            ll, greedy = _full(m, ctx, cont)
            assert abs(s.loglik - ll) <= 1e-5 and s.greedy == greedy and s.n_tokens == len(cont)
    plain = [(R(2 + i), R(1 + i % 3)) for i in range(7)]  # no shared prefix: sorted and padded batches
    plain += [(plain[0][0], R(1)), (plain[0][0], R(1)), (plain[1][0], R(1))]  # and one-token choices
    for (ctx, cont), s in zip(plain, Scorer(m, batch_size=3, progress=False).loglikelihood(plain)):
        assert abs(s.loglik - _full(m, ctx, cont)[0]) <= 1e-5


def _by_hand(m, ctx, cont):
    """The hand reference: sum over the continuation's tokens of log-softmax(logits)[token], each
    from its own plain forward of everything before it (no cache, no batch, no padding)."""
    total = 0.0
    with torch.no_grad():
        for j, t in enumerate(cont):
            lg = m.logits(m(torch.tensor([ctx + cont[:j]])))[0, -1, :m.config.vocab_size].double()
            total += float(lg.log_softmax(-1)[t])
    return total


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_scorer_multi_token_choices_match_sums_of_log_softmax(kind):
    """Choices of several tokens (e.g. " a city in Germany"): contexts batched, each one's K/V
    expanded to its choices, contexts of one length sharing the choices' forward; with a shared
    k-shot prefix and without, contexts equal to the prefix, choices of 1 to 5 tokens mixed."""
    from pretune.evaluation.loglikelihood import Scorer
    kw = dict(position="rotary", norm="rmsnorm", mlp="swiglu", norm_placement="pre") if kind == "rotary" else {}
    m = _model(**kw)
    g = torch.Generator().manual_seed(2)
    R = lambda n: torch.randint(0, 320, (n,), generator=g).tolist()  # noqa: E731
    for demos in (R(10), []):
        reqs = []
        for k, n in enumerate((3, 5, 5, 5, 2, 7, 3)):  # three contexts of one length, others apart
            ctx = demos + R(n) if demos or k else R(n)
            reqs += [(ctx, R(1 + (k + c) % 5)) for c in range(2 + k % 3)]
        if demos:
            reqs += [(demos, R(3)), (demos, R(1)), (demos, R(2))]  # the prefix itself, with choices
        for bs in (1, 2, 16):
            got = Scorer(m, batch_size=bs, progress=False).loglikelihood(reqs)
            for (ctx, cont), s in zip(reqs, got):
                assert abs(s.loglik - _by_hand(m, ctx, cont)) <= 1e-5
                assert s.greedy == _full(m, ctx, cont)[1] and s.n_tokens == len(cont)


def test_requests_follow_the_harness_conventions(bpe):
    from pretune.evaluation.loglikelihood import encode_pair, fit_window
    ctx, cont = encode_pair(bpe, "The quick brown ", "fox")  # the trailing space moves to the continuation
    assert ctx == bpe.encode("The quick brown") and ctx + cont == bpe.encode("The quick brown fox")
    assert encode_pair(bpe, "", "fox") == ([bpe.eos_id], bpe.encode("fox"))  # no BOS: end-of-text as the prefix
    long = (list(range(50)), [7, 8])
    assert fit_window([long], 40, "left") == [(list(range(50))[-39:], [7, 8])]  # (ctx + cont)[-(40 + 1):]
    from pretune.errors import PretuneError
    with pytest.raises(PretuneError, match="more than the model's window of 40"):
        fit_window([long], 40, None)


def test_windows_and_perplexity_match_the_hugging_face_guide(bpe):
    from pretune.evaluation.perplexity import perplexity, windows
    assert windows(7, 3, 3) == [(0, 1, 4), (3, 4, 7)]
    assert windows(7, 4, 2) == [(0, 1, 5), (2, 5, 7)]
    assert windows(9, 4, 2) == [(0, 1, 5), (2, 5, 7), (4, 7, 9)]
    m = _model(max_seq_len=16)
    doc = " ".join(TEXT[:2])
    s = [bpe.eos_id] + bpe.encode(doc)
    # Hugging Face's "Perplexity of fixed-length models" loop (stride 5; its max_length = 16 inputs + the target)
    nll, prev_end, L, S = 0.0, 1, 16, 5
    for begin in range(0, len(s), S):
        end = min(begin + L + 1, len(s))  # input s[begin:end-1] (at most L tokens), targets up to end
        inp = s[max(0, end - 1 - L):end - 1]
        with torch.no_grad():
            lp = m.logits(m(torch.tensor([inp])))[0, :, :320].log_softmax(-1)
        off = max(0, end - 1 - L)
        nll -= sum(lp[j - 1 - off, s[j]].item() for j in range(prev_end, end))
        prev_end = end
        if end == len(s):
            break
    r = perplexity(m, bpe, [doc], window=16, stride=5, progress=False)
    assert r["tokens"] == len(s) - 1 and abs(r["nll"] - nll) <= 1e-4
    assert abs(r["bits_per_byte"] - r["nll"] / (math.log(2) * len(doc.encode()))) <= 1e-12


def test_k_shot_draws_are_balanced_and_seeded():
    from pretune.data.labelled import Example
    from pretune.errors import PretuneError
    from pretune.evaluation.prompting import draw_shots
    train = [Example(f"t{i}", i % 3) for i in range(30)]
    a = draw_shots(train, 7, 3, seed=0)
    counts = sorted(sum(e.label == c for e in a) for c in range(3))
    assert len(a) == 7 and counts == [2, 2, 3] and len(set(a)) == 7
    assert a == draw_shots(train, 7, 3, seed=0) and a != draw_shots(train, 7, 3, seed=1)
    with pytest.raises(PretuneError, match="the training split holds 30"):
        draw_shots(train, 31, 3, 0)


def test_acc_norm_divides_by_the_choice_length_in_characters():
    from pretune.evaluation.loglikelihood import Scored
    from pretune.evaluation.multiple_choice import Choice, mc_metrics
    ex = [Choice("c", ("ab", "abcdef"), 1), Choice("c", ("x", "y"), 0)]
    s = [Scored(-2.0, False, 1), Scored(-3.0, False, 1), Scored(-1.0, False, 1), Scored(-1.0, False, 1)]
    m = mc_metrics(ex, s)  # ex 1: acc picks "ab" (-2 > -3), acc_norm "abcdef" (-0.5 > -1); ex 2: a tie -> the first
    assert (m["acc"], m["acc_norm"]) == (0.5, 1.0)


def test_cloze_pattern_reads_the_mlm_head_at_the_mask():
    from pretune.evaluation.prompting import _mlm_logprobs
    from pretune.evaluation.templates import Template
    from pretune.tokenizer.vocabularies import train_tokenizer
    tok = train_tokenizer("wordpiece", 320, TEXT + ["great terrible"] * 5)
    m = _model(causal=False, norm_placement="post", type_vocab_size=2, nsp_head=True)
    t = Template("{text}", {"negative": "terrible", "positive": "great"}, "{text} It was [MASK].",
                 {"negative": "terrible", "positive": "great"})
    texts = ["the quick brown fox", "call me ishmael some years ago"]
    got = _mlm_logprobs(m, tok, [t.fill_pattern(x) for x in texts], t, ["negative", "positive"], None, "test")
    words = [tok.token_to_id("terrible"), tok.token_to_id("great")]
    for x, row in zip(texts, got):
        ids, _ = tok.encode_pair(x + " It was [MASK].")
        with torch.no_grad():
            lg = m.logits(m(torch.tensor([ids])))[0, ids.index(tok.mask_id)]
        assert torch.allclose(row, lg[words].double().log_softmax(-1), atol=1e-5)


def test_evaluate_tasks_end_to_end(bpe, tmp_path, capsys):
    from pretune.interop import write_run
    run = write_run(tmp_path / "run", _model(max_seq_len=128), bpe, {"kind": "test"})
    (tmp_path / "text.txt").write_text("\n\n".join(TEXT[:6]))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"context": f"Document {i}.", "choices": ["The quick", "Call me"],
                                                           "gold": "The quick"}) + "\n" for i in range(5)))
    rows = [f"the film was {'good' if i % 2 else 'bad'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(60)]
    (tmp_path / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "res.json"
    assert main(["evaluate", "--run", str(run), "--tasks", f"perplexity:{tmp_path / 'text.txt'},mc:{tmp_path / 'mc.jsonl'},"
                 f"prompt:{tmp_path / 'task.csv'}", "--tasks.shots", "0,2", "--tasks.seeds", "0,1", "--tasks.calibrate",
                 "--tasks.json", str(out), "--tasks.plot", str(tmp_path / "shots.png")]) == 0
    d = json.loads(out.read_text())
    r = {(x["task"], x.get("shots")): x for x in d["results"]}
    ppl = r[(f"perplexity:{tmp_path / 'text.txt'}", None)]
    assert ppl["n"] == 6 and ppl["bits_per_byte"] > 0 and ppl["perplexity"] > 1
    assert r[(f"mc:{tmp_path / 'mc.jsonl'}", None)]["n"] == 5
    two = r[(f"prompt:{tmp_path / 'task.csv'}", 2)]
    assert two["seeds"] == [0, 1] and len(two["per_seed"]) == 2 and two["n"] == 6 and two["calibrated"]
    assert (tmp_path / "shots.png").stat().st_size > 1000
    assert "acc_norm" in capsys.readouterr().out
