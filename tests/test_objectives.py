"""The objectives on the inputs that broke them: a masked-LM batch the Bernoulli draw
left without a prediction, and a mixture-of-experts model's validation loss, each
against references computed by hand (the generator's own draws replayed; cross-entropy
of the model's logits)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretune import Transformer
from pretune.cli import main
from pretune.config.model import ModelConfig
from pretune.data.loaders import PairBatches, eval_batches
from pretune.data.prepare import prepare
from pretune.fileio import atomic_write_json
from pretune.objectives.linear_cross_entropy import IGNORE
from pretune.objectives.losses import mlm_loss
from pretune.objectives.masking import mlm_mask
from pretune.runs import checkpoint as ckpt
from pretune.tokenizer.vocabularies import train_tokenizer
from pretune.training.config import TrainConfig
from pretune.training.pretrain import build_pretraining

PAD, CLS, SEP, MASK = 0, 1, 2, 3
V = 40


def bert_cfg(**kw):
    return ModelConfig(**{**dict(name="t", causal=False, vocab_size=V, max_seq_len=16, n_layer=1, n_head=2,
                                 d_model=16, dropout=0.0, type_vocab_size=2, nsp_head=True, norm_placement="post",
                                 embedding_norm=True, mlp="gelu"), **kw})


def two_token_pairs(B=4, T=8, seed=0):
    """[CLS] a [SEP] b [SEP] [PAD]...: two maskable tokens per row, BERT's shortest pair."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((B, T), PAD)
    ids[:, 0], ids[:, 2], ids[:, 4] = CLS, SEP, SEP
    ids[:, 1], ids[:, 3] = torch.randint(5, V, (B,), generator=g), torch.randint(5, V, (B,), generator=g)
    return ids, ids < 5


# ---- item 1: at least one MLM prediction per sequence ---------------------------------

def test_a_two_token_pair_always_has_a_prediction_and_a_finite_loss():
    # The Bernoulli(0.15) draw leaves both tokens of a row unchosen with probability 0.85^2 = 0.72,
    # and a batch of 4 such rows without any prediction with 0.72^4 = 0.27: mean over nothing, NaN.
    torch.manual_seed(0)
    model = Transformer(bert_cfg())
    ids, special = two_token_pairs()
    picked = torch.zeros(2)
    for seed in range(200):
        out, labels = mlm_mask(ids, special, MASK, V, torch.Generator().manual_seed(seed))
        chosen = labels != IGNORE
        assert chosen.sum(1).min() >= 1, seed  # every row predicts something
        assert not chosen[special].any() and torch.equal(labels[chosen], ids[chosen])
        h = model(out, attention_mask=~(ids == PAD))
        assert torch.isfinite(mlm_loss(model, h, labels)), seed
        picked += chosen[:, [1, 3]].float().sum(0)
    # neither of the two tokens is favoured (each is chosen in ~half the rows, more when both are)
    assert abs(picked[0] - picked[1]) < 0.15 * picked.sum()


def test_the_fallback_is_the_smallest_draw_and_leaves_other_rows_alone():
    """mlm_mask's rule, replayed from the same generator: chosen = u < 0.15 on non-special
    tokens; a row with none takes its non-special token of smallest u; a row of special
    tokens only predicts nothing. The first draw u is the generator's first rand."""
    T = 12
    ids = torch.randint(5, V, (64, T), generator=torch.Generator().manual_seed(3))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    special[:, 7:] = True  # 6 maskable tokens a row: P(none chosen) = 0.85^6 = 0.38
    special[5] = True  # nothing to predict in row 5
    for seed in range(5):
        _, labels = mlm_mask(ids, special, MASK, V, torch.Generator().manual_seed(seed))
        u = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed))
        for r in range(len(ids)):
            bern = {c for c in range(T) if u[r, c] < 0.15 and not special[r, c]}
            if not bern and r != 5:
                bern = {min((c for c in range(T) if not special[r, c]), key=lambda c: float(u[r, c]))}
            assert {c for c in range(T) if labels[r, c] != IGNORE} == bern, (seed, r)


def test_mlm_loss_of_a_batch_without_predictions_is_zero_with_a_graph():
    torch.manual_seed(0)
    model = Transformer(bert_cfg())
    ids, _ = two_token_pairs()
    h = model(ids)
    loss = mlm_loss(model, h, torch.full_like(ids, IGNORE))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # the trainer's backward runs; nothing moves
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_pair_batches_of_short_sentences_always_predict(tmp_path):
    """PairBatches on documents of two-word sentences: pairs of 2..5 tokens."""
    rng = np.random.default_rng(0)
    words = "ab cd ef gh ij kl mn op".split()
    text = "\n\n".join(" ".join(f"{rng.choice(words)} {rng.choice(words)}." for _ in range(3)) for _ in range(40))
    (tmp_path / "c.txt").write_text(text + "\n")
    tok = train_tokenizer("wordpiece", 60, [text])
    prepare([str(tmp_path / "c.txt")], tok, tmp_path / "d", val_fraction=0.2, progress=False)
    pb = PairBatches(tmp_path / "d", "train", 2, 8, 0, tok.special_dict(), tok.vocab_size)
    for _ in range(100):
        b = next(pb)
        assert ((b["labels"] != IGNORE).sum(1) >= 1).all()


# ---- item 3: a MoE model's validation loss is the task loss alone ----------------------

def ce_by_hand(logits, labels):
    """Mean over the labelled rows of -log softmax(logits)[label], the log-sum-exp written out."""
    logits, labels = logits.double(), labels.flatten()
    logits = logits.reshape(-1, logits.shape[-1])
    keep = labels != IGNORE
    z, y = logits[keep], labels[keep]
    m = z.max(-1).values
    lse = m + torch.log(torch.exp(z - m[:, None]).sum(-1))
    return float((lse - z[torch.arange(len(y)), y]).mean())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and dog ran to it".split()
    text = "\n\n".join(". ".join(" ".join(rng.choice(words, 6)) for _ in range(4)) + "." for _ in range(60))
    d = tmp_path_factory.mktemp("moe-val")
    (d / "c.txt").write_text(text + "\n")
    out = {}
    for kind in ("bpe", "wordpiece"):
        tok = train_tokenizer(kind, 300 if kind == "bpe" else 80, [text])
        prepare([str(d / "c.txt")], tok, d / kind, val_fraction=0.3, progress=False)
        out[kind] = (d / kind, tok)
    return out


def moe_model(causal, tok, **kw):
    torch.manual_seed(0)
    base = dict(name="moe", vocab_size=tok.vocab_size, max_seq_len=16, n_layer=2, n_head=2, d_model=16,
                dropout=0.0, n_expert=4, top_k=2, capacity_factor=1.0, aux_loss_coef=0.1, z_loss_coef=0.01)
    if not causal:
        base.update(causal=False, type_vocab_size=2, nsp_head=True, norm_placement="post", embedding_norm=True)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("causal", [True, False], ids=["gpt-L1", "bert-MLM+NSP"])
def test_moe_val_loss_is_the_task_loss_by_hand(data, causal):
    folder, tok = data["bpe" if causal else "wordpiece"]
    model = moe_model(causal, tok)
    tc = TrainConfig(batch_size=3, eval_batches=2)
    _, eval_fn_for, _ = build_pretraining(model.config, tc, folder, 16)
    with torch.no_grad():
        m = eval_fn_for(model)()
        task, aux = [], []
        for b in eval_batches(folder, "val", 3, 16, n_batches=2, causal=causal):
            h = model(b["input_ids"], segment_ids=b.get("segment_ids"), attention_mask=b.get("attention_mask"))
            logits = model.logits(h)[..., :tok.vocab_size]
            if causal:  # L1: every position predicts the next token
                task.append(ce_by_hand(logits, b["targets"]))
            else:  # MLM at the masked positions + NSP on the pooled [CLS]
                task.append(ce_by_hand(logits, b["labels"]) + ce_by_hand(model.nsp_head(h), b["nsp_labels"]))
            aux.append(float(sum(blk.mlp.aux_loss for blk in model.blocks)))
    assert m["val_loss"] == pytest.approx(sum(task) / 2, rel=1e-5)
    assert m["val_moe_aux"] == pytest.approx(sum(aux) / 2, rel=1e-5) and m["val_moe_aux"] > 0.1  # logged apart


def test_evaluate_reports_the_perplexity_of_l1_alone(data, tmp_path, capsys):
    folder, tok = data["bpe"]
    model = moe_model(True, tok)
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_json(run / "config.json", {"model": model.config.to_dict(), "data": str(folder),
                                            "train": {"batch_size": 3, "eval_batches": 2, "seq_len": 16}})
    tok.save(run)
    ckpt.save_checkpoint(run, 0, model)
    assert main(["evaluate", "--run", str(run), "--json-out"]) == 0
    m = json.loads(capsys.readouterr().out.splitlines()[-1])
    with torch.no_grad():
        l1 = [ce_by_hand(model.logits(model(b["input_ids"]))[..., :tok.vocab_size], b["targets"])
              for b in eval_batches(folder, "val", 3, 16, n_batches=2, causal=True)]
    assert m["val_loss"] == pytest.approx(sum(l1) / 2, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(sum(l1) / 2), rel=1e-5)
    assert m["val_moe_aux"] > 0.1
