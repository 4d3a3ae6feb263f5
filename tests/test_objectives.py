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
from pretune.data.loaders import PairBatches, validation_batches
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
        for b in validation_batches("windows" if causal else "pairs", folder, "val", 3, 16, n_batches=2):
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
              for b in validation_batches("windows", folder, "val", 3, 16, n_batches=2)]
    assert m["val_loss"] == pytest.approx(sum(l1) / 2, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(sum(l1) / 2), rel=1e-5)
    assert m["val_moe_aux"] > 0.1


# ---- the objectives seam: objectives/registry.py ------------------------------------------

def test_a_registered_toy_objective_runs_end_to_end_and_its_share_reaches_the_mfu(data, tmp_path, monkeypatch,
                                                                                    capsys):
    """A toy pre-training objective, L1 at the even positions only (half the LM head's rows), is
    registered and run by the ordinary pre-training loop with no other edit: the run records it,
    the loop minimises it, validation and `pretune evaluate` report its loss (no perplexity: it
    says it has none), and the MFU hook counts the head at half: 6 x 0.5 x V_pad x d fewer FLOPs
    per token than L1, V_pad = 283 tokens padded to 320, d = 16."""
    from pretune.models.counting import train_flops_per_token
    from pretune.objectives import registry
    from pretune.objectives.losses import next_token_loss
    from pretune.training.pretrain import pretrain

    folder, tok = data["bpe"]
    calls = []

    def even_l1(model, batch):
        calls.append(1)
        targets = batch["targets"].clone()
        targets[:, 1::2] = IGNORE
        loss = next_token_loss(model, model(batch["input_ids"]), targets)
        return loss, {"l1_even": loss}

    monkeypatch.setitem(registry.OBJECTIVES, "toy-even-L1", registry.Objective(
        "toy-even-L1", "pretrain", task_loss=even_l1, batches="windows", predicted=0.5, template="decoder"))
    cfg = ModelConfig(name="toy", vocab_size=tok.vocab_size, max_seq_len=16, n_layer=1, n_head=2, d_model=16,
                      dropout=0.0)
    assert tok.vocab_size == 283 and cfg.padded_vocab_size == 320  # 283 rounded up to a multiple of 64
    tc = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup=0, eval_every=4, eval_batches=2, log_every=1,
                     ckpt_every=4, device="cpu", guard=False)
    run = tmp_path / "toy"
    final = pretrain(cfg, tc, folder, run, progress=False, objective="toy-even-L1")
    assert json.loads((run / "run.json").read_text())["objective"] == "toy-even-L1"
    assert len(calls) == 4 + 2  # 4 training steps, 2 validation batches: the toy's loss, nothing else
    assert "val_l1_even" in final and "val_l1" not in final
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if "tok_per_s" in r and "model_flops_per_s" in r]
    assert rec
    full = train_flops_per_token(cfg, 16)  # L1's count (tests/test_compute.py checks it by hand)
    for r in rec:
        assert r["model_flops_per_s"] / r["tok_per_s"] == pytest.approx(full - 6 * 0.5 * 320 * 16, rel=1e-12)
    calls.clear()
    assert main(["evaluate", "--run", str(run), "--data", str(folder), "--json-out"]) == 0
    m = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert calls and "perplexity" not in m  # read from the run's field, not from causal=True


def test_the_mlm_share_that_flops_count_is_maskings_constant():
    """One 15%: the masking's default probability, the MLM+NSP entry's predicted share, and the
    share the MFU hook counts the head at for an encoder (BERT-base: V_pad = 30,528, d = 768)."""
    import inspect

    from pretune.config.presets import preset
    from pretune.models.counting import train_flops_per_token
    from pretune.objectives import masking, registry
    from pretune.training.hooks import MFUHook

    assert masking.MLM_P == 0.15
    assert inspect.signature(mlm_mask).parameters["p"].default == masking.MLM_P
    assert registry.get("MLM+NSP").predicted == masking.MLM_P and registry.get("L1").predicted == 1.0
    cfg = preset("bert-base")
    full = train_flops_per_token(cfg, 512)
    assert MFUHook(cfg, 512).flops_per_token == pytest.approx(full - 6 * 0.85 * (30_528 * 768 + 768 * 768))


def test_objective_lookup_names_the_near_ones_and_old_runs_derive_theirs():
    from pretune.errors import PretuneError
    from pretune.objectives import registry

    with pytest.raises(PretuneError, match=r"unknown objective 'MLM\+nsp'.*did you mean MLM\+NSP"):
        registry.get("MLM+nsp")
    with pytest.raises(PretuneError, match="unknown objective 'L1': use L2 or L3"):
        registry.get("L1", "finetune")  # a pre-training objective is no fine-tuning one
    gpt, bert = ModelConfig(name="g", n_layer=1, d_model=16, n_head=2), bert_cfg()
    assert registry.derived_objective(gpt) == "L1" and registry.derived_objective(bert) == "MLM+NSP"
    # a run's recorded field wins; a fine-tuned run's body keeps its own
    assert registry.body_objective(gpt, {"objective": "MLM+NSP"}).name == "MLM+NSP"
    assert registry.body_objective(bert, {"objective": "L2", "finetune": {"body_objective": "L1"}}).name == "L1"
    assert registry.body_objective(bert, {"objective": "L2"}).name == "MLM+NSP"  # from before the field
    assert (registry.get("L1").template, registry.get("MLM+NSP").template) == ("decoder", "encoder")
    assert registry.get("L1").perplexity and not registry.get("MLM+NSP").perplexity


def test_an_unknown_loader_name_fails_in_one_line(tmp_path):
    from pretune.data.loaders import training_batches
    from pretune.errors import PretuneError

    with pytest.raises(PretuneError, match="unknown batch loader 'window'.*did you mean windows"):
        training_batches("window", tmp_path, 2, 8, 0)
