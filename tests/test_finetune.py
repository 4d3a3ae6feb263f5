"""Fine-tuning: the head, L2 and L3 against the pre-training objectives, freezing,
early stopping, exact resume through the Trainer, and the three commands end to end."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretune.cli import main
from pretune.config.model import ModelConfig
from pretune.data.encoding import ClassificationBatches, TextEncoder, collate
from pretune.data.labelled import Example
from pretune.errors import PretuneError
from pretune.evaluation.classification import classification_metrics
from pretune.fileio import atomic_write_json
from pretune.models.heads import Classifier
from pretune.models.load import load_classifier, load_model
from pretune.models.transformer import Transformer
from pretune.objectives.finetuning import finetune_loss
from pretune.objectives.linear_cross_entropy import IGNORE
from pretune.objectives.losses import l1_loss, shift_targets
from pretune.runs import checkpoint as ckpt
from pretune.tasks.build import build_classifier, freeze
from pretune.tokenizer.vocabularies import train_tokenizer
from pretune.training.config import TrainConfig
from pretune.training.hooks import EarlyStopping, Hook
from pretune.training.loop import Trainer

POS = "good great fine fun".split()
NEG = "bad awful dull boring".split()
NEUTRAL = "film movie plot actor scene story the a".split()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, and much faster when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_rows(n=240, seed=0):
    """A keyword task: the label says whether the text holds a positive or a negative word."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(NEUTRAL, size=rng.integers(2, 8))) + [rng.choice(POS if y else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", "pos" if y else "neg"))
    return rows


@pytest.fixture(scope="module")
def toks():
    texts = [t for t, _ in toy_rows()]
    return {True: train_tokenizer("bpe", 300, texts), False: train_tokenizer("wordpiece", 120, texts)}


def tiny_cfg(causal, tok, **kw):
    return ModelConfig(**{**dict(name="tiny", causal=causal, vocab_size=tok.vocab_size, vocab_multiple=8,
                                 max_seq_len=32, n_layer=2, n_head=2, d_model=32, dropout=0.0,
                                 type_vocab_size=0 if causal else 2, nsp_head=not causal,
                                 embedding_norm=not causal, norm_placement="pre" if causal else "post",
                                 mlp="gelu_tanh" if causal else "gelu"), **kw})


def make_run(path, causal, tok, **kw):
    """A 'pre-trained' run directory as `pretune pretrain` leaves one (random weights)."""
    torch.manual_seed(1)
    cfg = tiny_cfg(causal, tok, **kw)
    m = Transformer(cfg)
    path.mkdir(parents=True)
    atomic_write_json(path / "config.json", {"model": cfg.to_dict()})
    tok.save(path)
    ckpt.save_checkpoint(path, 0, m)
    return path


def toy_batch(tok, causal, n=6, seed=0):
    te = TextEncoder(tok, causal, 32)
    ex = [Example(t, int(y == "pos")) for t, y in toy_rows(n, seed)]
    return collate(te.encode(ex), range(n), te.pad_id), te


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---- the head -----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_head_reads_the_same_summary_padded_or_alone(toks, causal):
    """With right padding and the attention mask, each row's class logits equal those of the
    sequence run alone: the decoder reads the last real token, the encoder [CLS]."""
    tok = toks[causal]
    torch.manual_seed(0)
    model = build_classifier(Transformer(tiny_cfg(causal, tok)), tiny_cfg(causal, tok), 3).eval()
    b, _ = toy_batch(tok, causal)
    assert not b["attention_mask"].all()
    logits, _ = model(b["input_ids"], b["attention_mask"], b["lengths"], b.get("segment_ids"))
    for r in range(len(b["labels"])):
        n = int(b["lengths"][r])
        ids = b["input_ids"][r:r + 1, :n]
        h = model.body(ids, segment_ids=b["segment_ids"][r:r + 1, :n] if not causal else None)
        if causal:
            want = model.head.out(h[0, n - 1])  # h_l^m W_y at the extract token
        else:
            want = model.head.out(torch.tanh(model.head.pooler(h[0, 0])))  # pooled [CLS]
        torch.testing.assert_close(logits[r], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_mean_pooling_is_the_mean_over_the_real_tokens(toks, causal):
    """pool='mean' (Sentence-BERT's): each padded row's logits equal W_y applied to the plain
    mean of h_n over that sequence run alone, padding excluded."""
    tok = toks[causal]
    torch.manual_seed(0)
    model = build_classifier(Transformer(tiny_cfg(causal, tok)), tiny_cfg(causal, tok), 3, pool="mean").eval()
    assert model.head.pooler is None
    b, _ = toy_batch(tok, causal)
    logits, _ = model(b["input_ids"], b["attention_mask"], b["lengths"], b.get("segment_ids"))
    for r in range(len(b["labels"])):
        n = int(b["lengths"][r])
        h = model.body(b["input_ids"][r:r + 1, :n],
                       segment_ids=b["segment_ids"][r:r + 1, :n] if not causal else None)[0]
        want = model.head.out(sum(h[i] for i in range(n)) / n)
        torch.testing.assert_close(logits[r], want, rtol=1e-5, atol=1e-5)


def test_encoder_head_starts_from_the_nsp_pooler(toks, tmp_path):
    from pretune.tasks.build import load_init
    run = make_run(tmp_path / "bert", False, toks[False])
    body, cfg, tok, pooler, _ = load_init(run)
    want = body.nsp_head.pooler.dense.weight.detach().clone()
    clf = build_classifier(body, cfg, 2, pooler)
    assert torch.equal(clf.head.pooler.weight, want)
    assert clf.body.nsp_head is None and not clf.config.nsp_head


# ---- L2 and L3 ----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_l3_with_lambda_zero_is_l2_exactly(toks, causal):
    tok = toks[causal]
    torch.manual_seed(0)
    model = build_classifier(Transformer(tiny_cfg(causal, tok)), tiny_cfg(causal, tok), 2)
    b, te = toy_batch(tok, causal)
    if not causal:
        src = ClassificationBatches(te.encode([Example(t, int(y == "pos")) for t, y in toy_rows(6)]), 6, 0,
                                    te.pad_id, mlm={"mask_id": tok.mask_id, "vocab_size": tok.vocab_size,
                                                    "special_ids": tok.special_ids})
        b = next(src)
    grads = {}
    for name, fn in (("L2", finetune_loss("L2")), ("L3", finetune_loss("L3", lam=0.0))):
        model.zero_grad()
        torch.manual_seed(5)  # the same dropout masks (the head's dropout is on in training)
        loss, parts = fn(model, b)
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
    assert torch.equal(grads["L2"][0], grads["L3"][0])
    g2, g3 = grads["L2"][1], grads["L3"][1]
    assert all(torch.equal(g2[n], g3[n]) for n in g2)
    assert all(not g3[n].any() for n in set(g3) - set(g2))  # the LM head: zero gradient, not another one


def test_l1_inside_l3_is_the_pretraining_l1(toks):
    tok = toks[True]
    torch.manual_seed(0)
    model = build_classifier(Transformer(tiny_cfg(True, tok)), tiny_cfg(True, tok), 2)
    b, _ = toy_batch(tok, True)
    loss, parts = finetune_loss("L3", lam=0.5)(model, b)
    # the pre-training L1 on the same tokens: next-token targets, nothing past the last real token
    ref = l1_loss(model.body, b["input_ids"], shift_targets(b["input_ids"], b["attention_mask"]),
                  b["attention_mask"])
    torch.testing.assert_close(parts["l1"], ref, rtol=0, atol=1e-6)
    # and by hand: mean over real next tokens of -log softmax
    h = model.body(b["input_ids"], attention_mask=b["attention_mask"])
    logp = model.body.logits(h)[..., :model.body.config.vocab_size].log_softmax(-1)  # real tokens only
    terms = [-logp[r, i, b["input_ids"][r, i + 1]] for r in range(len(b["lengths"]))
             for i in range(int(b["lengths"][r]) - 1)]
    torch.testing.assert_close(parts["l1"], torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, parts["l2"] + 0.5 * parts["l1"], rtol=0, atol=0)


def test_l3_on_an_encoder_adds_mlm_on_the_masked_copy(toks):
    tok = toks[False]
    torch.manual_seed(0)
    model = build_classifier(Transformer(tiny_cfg(False, tok)), tiny_cfg(False, tok), 2).eval()  # no dropout
    te = TextEncoder(tok, False, 32)
    enc = te.encode([Example(t, int(y == "pos")) for t, y in toy_rows(8)])
    b = next(ClassificationBatches(enc, 8, 0, te.pad_id, mlm={"mask_id": tok.mask_id, "vocab_size": tok.vocab_size,
                                                              "special_ids": tok.special_ids}))
    loss, parts = finetune_loss("L3", lam=0.5)(model, b)
    V = model.config.vocab_size
    with torch.no_grad():  # by hand: -log softmax, the log-sum-exp written out, at the chosen positions
        h2 = model.body(b["mlm_input_ids"], segment_ids=b["segment_ids"], attention_mask=b["attention_mask"])
        logits, _ = model(b["input_ids"], b["attention_mask"], b["lengths"], b["segment_ids"])
        mlm = ce_by_hand(model.body.logits(h2)[..., :V], b["mlm_labels"])
        l2 = ce_by_hand(logits, b["labels"])
    chosen = b["mlm_labels"] != IGNORE
    assert chosen.any() and torch.equal(b["mlm_labels"][chosen], b["input_ids"][chosen])  # the original tokens
    assert parts["mlm"].item() == pytest.approx(mlm, rel=1e-5)
    assert parts["l2"].item() == pytest.approx(l2, rel=1e-5)
    assert loss.item() == pytest.approx(l2 + 0.5 * mlm, rel=1e-5)


def ce_by_hand(logits, labels) -> float:
    """Mean over the labelled rows of -log softmax(logits)[label] = logsumexp(z) - z_y, in float64."""
    z, y = logits.double().reshape(-1, logits.shape[-1]), labels.flatten()
    z, y = z[y != IGNORE], y[y != IGNORE]
    mx = z.max(-1).values
    return float((mx + torch.log(torch.exp(z - mx[:, None]).sum(-1)) - z[torch.arange(len(y)), y]).mean())


def test_moe_auxiliary_loss_is_added(toks):
    """L2 plus each routed layer's aux_loss_coef * E sum_i f_i P_i (Switch Transformer, Fedus et al.
    2022, eq. 4) + z_loss_coef * mean logsumexp^2 (ST-MoE, Zoph et al. 2022, eq. 5), computed here
    from each layer's input and router weights over the real (unpadded) tokens."""
    tok = toks[True]
    cfg = tiny_cfg(True, tok, n_expert=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.manual_seed(0)
    model = build_classifier(Transformer(cfg), cfg, 2)
    b, _ = toy_batch(tok, True)
    assert not b["attention_mask"].all()  # padded rows: the padding is no token of the routers
    seen, out = [], {}
    for blk in model.body.blocks:
        blk.mlp.register_forward_pre_hook(lambda mod, a: seen.append((mod, a[0].detach())))
    model.head.register_forward_hook(lambda mod, a, y: out.update(logits=y.detach()))  # the pass's own dropout
    loss, parts = finetune_loss("L2")(model, b)
    real = b["attention_mask"].reshape(-1)
    aux = 0.0
    for mod, x in seen:
        xs = x.reshape(-1, cfg.d_model).double()[real]
        logits = xs @ mod.router.weight.detach().double().t()
        mx = logits.max(-1, keepdim=True).values
        p = torch.exp(logits - mx) / torch.exp(logits - mx).sum(-1, keepdim=True)
        lse = mx.squeeze(-1) + torch.log(torch.exp(logits - mx).sum(-1))
        top = [sorted(range(4), key=lambda e: -float(p[n, e]))[:2] for n in range(len(p))]
        f = [sum(e in t for t in top) / (2 * len(p)) for e in range(4)]
        balance = 4 * sum(f[e] * float(p[:, e].mean()) for e in range(4))
        aux += 0.1 * balance + 0.01 * float(lse.square().mean())
    assert len(seen) == cfg.n_layer and aux > 0.2  # balance >= 1 per layer
    assert parts["moe_aux"].item() == pytest.approx(aux, rel=1e-5)
    assert loss.item() == pytest.approx(ce_by_hand(out["logits"], b["labels"]) + aux, rel=1e-5)


def test_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(0.6)
    # F1: class 0: 2*1/(2+1+1) = 0.5; class 1: 2*2/(4+1) = 0.8; class 2: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


# ---- freezing, early stopping, resume -----------------------------------------------------

def test_freeze_embeddings_and_lowest_blocks(toks):
    tok = toks[False]
    model = build_classifier(Transformer(tiny_cfg(False, tok)), tiny_cfg(False, tok), 2)
    assert freeze(model, "1") == "the embeddings and the lowest 1 blocks"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"body.wte.weight", "body.wpe.weight", "body.wse.weight"} <= frozen
    assert any(n.startswith("body.blocks.0.") for n in frozen)
    assert not any(n.startswith(("body.blocks.1.", "head.")) for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    b, _ = toy_batch(tok, False)
    trainer = Trainer(model, TrainConfig(steps=2, batch_size=6, lr=1e-2, warmup=0, eval_every=0, log_every=1),
                      iter(lambda: b, None), finetune_loss("L2"), "/tmp/unused-never-written", progress=False)
    trainer.train_step()
    trainer.train_step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n
        elif not n.startswith("body.lm_head."):  # the MLM head has no part in L2
            assert not torch.equal(p, before[n]), n


@pytest.mark.parametrize("causal", [True, False])
def test_finetune_resume_is_bit_identical(toks, tmp_path, causal):
    """20 steps straight == 10 steps, a new process state, resume, 10 more (L3, with
    evaluation, early-stopping state and the head's dropout in play)."""
    tok = toks[causal]
    te = TextEncoder(tok, causal, 32)
    enc = te.encode([Example(t, int(y == "pos")) for t, y in toy_rows(40)])
    val = te.encode([Example(t, int(y == "pos")) for t, y in toy_rows(12, seed=1)])
    mlm = None if causal else {"mask_id": tok.mask_id, "vocab_size": tok.vocab_size, "special_ids": tok.special_ids}

    class StopAt(Hook):
        def after_step(self, trainer, loss, parts):
            if trainer.step == 10:
                trainer.stop_requested = True

    def trainer(d, hooks=()):
        torch.manual_seed(7)
        model = build_classifier(Transformer(tiny_cfg(causal, tok, dropout=0.1)), tiny_cfg(causal, tok), 2)
        from pretune.evaluation.classification import predict

        def eval_fn():
            p = predict(model, val, te.pad_id)
            return {"val_loss": F.nll_loss(p.log(), torch.tensor(val.labels)).item()}
        tc = TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup=4, decay="linear", min_lr_ratio=0.0,
                         eval_every=5, ckpt_every=5, log_every=5, seed=3)
        return Trainer(model, tc, ClassificationBatches(enc, 8, 3, te.pad_id, mlm=mlm), finetune_loss("L3", 0.5),
                       d, eval_fn=eval_fn, hooks=[EarlyStopping(None), *hooks], progress=False)

    straight = trainer(tmp_path / "a")
    straight.fit()
    first = trainer(tmp_path / "b", [StopAt()])
    first.fit()
    assert first.step == 10
    torch.manual_seed(999)
    second = trainer(tmp_path / "b")
    second.fit()
    assert second.step == 20
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a == [{**r, "tok_per_s": x["tok_per_s"]} if "tok_per_s" in r else r for r, x in zip(b, a)]


# ---- the commands ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("task") / "toy.csv", toy_rows(240))


def test_finetune_learns_then_classify_and_evaluate(toks, tmp_path, toy_csv, capsys):
    """A keyword task a tiny decoder learns in a few epochs; the run then serves classify and evaluate."""
    init = make_run(tmp_path / "gpt", True, toks[True])
    out = tmp_path / "ft"
    rc = main(["finetune", "--init", str(init), "--task", str(toy_csv), "--train.lr", "3e-3", "--finetune.epochs", "6",
               "--train.batch-size", "16", "--finetune.patience", "3", "--out", str(out), "--train.device", "cpu"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["accuracy"] >= 0.9, res["test"]
    assert res["majority_baseline"]["accuracy"] == pytest.approx(0.5)
    # the kept step: the highest validation accuracy, the lowest loss among those (training/selection.py)
    vals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_acc" in r]
    want = min(vals, key=lambda r: (-r["val_acc"], r["val_loss"], r["step"]))
    assert (res["best_step"], res["best_val_acc"]) == (want["step"], want["val_acc"])
    assert res["selected_by"] == "validation accuracy, then loss"
    assert (out / "confusion.png").stat().st_size > 0
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["task"]["labels"] == ["neg", "pos"] and cfg["objective"] == "L2"
    capsys.readouterr()
    assert main(["classify", "--run", str(out), "a great film", "the plot was awful", "--json-out"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in lines] == ["pos", "neg"]
    assert sum(lines[0]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    texts = tmp_path / "texts.txt"
    texts.write_text("fun scene\n\nboring story\n")
    assert main(["classify", "--run", str(out), f"@{texts}", "--json-out"]) == 0
    assert [json.loads(l)["label"] for l in capsys.readouterr().out.splitlines()] == ["pos", "neg"]
    assert main(["evaluate", "--run", str(out), "--json-out"]) == 0
    ev = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ev["accuracy"] == pytest.approx(res["test"]["accuracy"])  # the best checkpoint, the same split
    # the fine-tuned body loads wherever a run is expected
    body, c, _ = load_model(out)
    assert isinstance(body, Transformer) and c.causal
    # rerunning the finished command resumes, changes nothing
    before = (out / "results.json").read_text()
    assert main(["finetune", "--init", str(init), "--task", str(toy_csv), "--train.lr", "3e-3", "--finetune.epochs", "6",
                 "--train.batch-size", "16", "--finetune.patience", "3", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["test"] == json.loads(before)["test"]


def test_finetune_encoder_l3_from_preset_free_run(toks, tmp_path, toy_csv):
    init = make_run(tmp_path / "bert", False, toks[False])
    out = tmp_path / "ft"
    assert main(["finetune", "--init", str(init), "--task", str(toy_csv), "--finetune.objective", "L3", "--finetune.lam", "0.5",
                 "--train.lr", "3e-3", "--finetune.epochs", "1", "--train.batch-size", "32", "--finetune.freeze", "embeddings",
                 "--finetune.train-examples", "64", "--out", str(out)]) == 0
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["finetune"]["aux_lm"] == "MLM" and cfg["finetune"]["train_examples"] == 64
    assert cfg["finetune"]["freeze"] == "the embeddings"
    model, _, _, info = load_classifier(out)
    assert isinstance(model, Classifier) and info["labels"] == ["neg", "pos"]
    assert model.head.pool == "cls"


def test_a_mean_pooled_run_is_served_mean_pooled(toks, tmp_path, toy_csv, capsys):
    """--pool mean is recorded in the run; classify rebuilds the same head and gives the
    probabilities the fine-tuned model gives."""
    init = make_run(tmp_path / "bert", False, toks[False])
    out = tmp_path / "ft"
    assert main(["finetune", "--init", str(init), "--task", str(toy_csv), "--finetune.pool", "mean", "--train.lr", "3e-3",
                 "--finetune.epochs", "1", "--train.batch-size", "32", "--finetune.train-examples", "64", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["finetune"]["head"] == "mean"
    model, cfg, tok, _ = load_classifier(out)
    assert model.head.pool == "mean" and model.head.pooler is None
    te = TextEncoder(tok, cfg.causal, 32)
    enc = te.encode([Example("a great film", 0)])
    b = collate(enc, [0], te.pad_id)
    with torch.no_grad():
        h = model.body(b["input_ids"], segment_ids=b["segment_ids"])[0]
        want = model.head.out(h.mean(0)).softmax(-1)
    capsys.readouterr()
    assert main(["classify", "--run", str(out), "a great film", "--json-out"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])["probabilities"]
    assert [got[k] for k in ("neg", "pos")] == pytest.approx(want.tolist(), abs=1e-3)



def test_finetuning_a_moe_model_logs_its_routers(toks, tmp_path, toy_csv):
    """The routers' loads, drops and entropy reach metrics.jsonl while fine-tuning, as in pre-training."""
    init = make_run(tmp_path / "moe", True, toks[True], n_expert=4, top_k=2)
    out = tmp_path / "ft"
    assert main(["finetune", "--init", str(init), "--task", str(toy_csv), "--finetune.objective", "L3", "--train.lr", "3e-3",
                 "--finetune.epochs", "1", "--train.batch-size", "16", "--finetune.train-examples", "64", "--train.log-every", "1",
                 "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "moe_expert_frac" in r]
    assert logged, "no router statistics in metrics.jsonl"
    for r in logged:
        assert len(r["moe_expert_frac"]) == 2  # one list per routed layer
        for layer in r["moe_expert_frac"]:
            assert len(layer) == 4 and abs(sum(layer) - 1) < 1e-4  # logged to 5 decimals
        assert 0 <= r["moe_entropy"] <= np.log(4) + 1e-6 and "moe_aux" in r

# ---- the loss-spike guard, as in pre-training (training/guard.py) ----------------------------------------

class LrBurst(Hook):
    """The lr multiplied by `factor` for the first `n` steps at or after `start` (transient:
    spent once, it does not come back after a rollback), as tests/test_guard.py injects it."""

    def __init__(self, start, n, factor):
        self.start, self.left, self.factor = start, n, factor

    def before_step(self, trainer):
        hit = trainer.step >= self.start and self.left > 0
        self.left -= hit
        for g in trainer.optimizer.param_groups:
            g["lr_scale"] = self.factor if hit else 1.0


def inject(monkeypatch, fault):
    """A NaN loss at the 40th training batch, or the lr x 1000 for 3 steps from step 40."""
    import pretune.tasks.finetune as ftm
    if fault == "nan":
        real, calls = ftm.finetune_loss, [0]

        def poisoned(objective="L2", lam=0.5, *body_objective):
            fn = real(objective, lam, *body_objective)

            def loss_fn(model, batch):
                loss, parts = fn(model, batch)
                calls[0] += 1
                return (loss * float("nan") if calls[0] == 40 else loss), parts
            return loss_fn
        monkeypatch.setattr(ftm, "finetune_loss", poisoned)
    else:
        class Bursting(ftm.Trainer):
            def __init__(self, *a, hooks=None, **kw):
                super().__init__(*a, hooks=[LrBurst(40, 3, 1000.0), *(hooks or [])], **kw)
        monkeypatch.setattr(ftm, "Trainer", Bursting)


def _vals_and_events(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r], [r for r in rows if r.get("event") == "rollback"]


@pytest.mark.parametrize("fault", ["nan", "lr-burst"])
def test_finetuning_guard_rolls_back_a_fault_and_finishes_finite(toks, tmp_path, toy_csv, monkeypatch, fault):
    """--train.guard (on by default) guards fine-tuning too: 72 steps of 16 (6 epochs, a checkpoint
    per epoch); the fault at step 40 is rolled back to step 36 and the run ends where a clean run
    ends (validation loss 0.018). With --train.guard false the same fault ruins the weights."""
    init = make_run(tmp_path / "gpt", True, toks[True])
    argv = ["finetune", "--init", str(init), "--task", str(toy_csv), "--train.lr", "3e-3", "--finetune.epochs", "6",
            "--train.batch-size", "16", "--train.device", "cpu"]
    with monkeypatch.context() as m:
        inject(m, fault)
        assert main(argv + ["--out", str(tmp_path / "guarded")]) == 0
    with monkeypatch.context() as m:
        inject(m, fault)
        assert main(argv + ["--out", str(tmp_path / "unguarded"), "--train.guard", "false"]) == 0
    assert main(argv + ["--out", str(tmp_path / "clean")]) == 0
    clean, none = _vals_and_events(tmp_path / "clean")
    assert none == [] and clean[-1] < 0.05  # no false alarm on a healthy run, whose loss heads for 0

    vals, events = _vals_and_events(tmp_path / "guarded")
    assert 1 <= len(events) <= 3 and all(e["to_checkpoint"] == "step-000036" for e in events)
    assert events[0]["reason"].startswith("non-finite loss" if fault == "nan" else "loss spike")
    assert all(math.isfinite(v) for v in vals) and vals[-1] < 2 * clean[-1], (vals, clean)
    w = ckpt.latest_checkpoint(tmp_path / "guarded")
    assert w.name == "step-000072"
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(w / "model.safetensors")).values())

    vals, events = _vals_and_events(tmp_path / "unguarded")
    assert events == []
    assert not math.isfinite(vals[-1]) or vals[-1] > 100 * clean[-1], (vals, clean)
    if fault == "nan":
        last = load_file(str(ckpt.latest_checkpoint(tmp_path / "unguarded") / "model.safetensors"))
        assert not all(torch.isfinite(t).all() for t in last.values())


def test_keep_best_forgets_weights_a_rollback_undid():
    """Without checkpoints per evaluation (the transfer experiment) the guard can roll back past
    the best evaluation KeepBest holds; those weights belong to a future that did not happen."""
    from pretune.training.hooks import KeepBest

    class T:
        model = torch.nn.Linear(2, 2)
        step, best_step = 36, 36
    k, t = KeepBest(), T()
    k.on_eval(t, {"val_loss": 0.1})
    assert k.step == 36 and k.state is not None
    t.step = 36
    k.on_checkpoint(t, None)  # a periodic save at the same step keeps it
    assert k.step == 36
    t.step = 0
    k.on_checkpoint(t, None)  # the save right after a rollback to step 0
    assert k.state is None and k.step is None


# ---- bad input: one line, exit 2, nothing written ------------------------------------------

def bad(argv, capsys, match, out=None):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and match in err, err
    if out is not None:
        assert not out.exists()


def test_bad_input(toks, tmp_path, toy_csv, capsys):
    init = make_run(tmp_path / "gpt", True, toks[True])
    out = tmp_path / "never"
    ft = ["finetune", "--init", str(init), "--out", str(out), "--finetune.epochs", "1"]
    bad(ft + ["--task", str(toy_csv), "--finetune.label-column", "gold"], capsys, "no label column 'gold'", out)
    one = write_csv(tmp_path / "one.csv", [(f"text {i}", "x") for i in range(20)])
    bad(ft + ["--task", str(one)], capsys, "1 class", out)
    empty = write_csv(tmp_path / "empty.csv", [("good film", "pos"), ("  ", "neg")])
    bad(ft + ["--task", str(empty)], capsys, "row 2 has an empty text", out)
    other = train_tokenizer("bpe", 320, ["completely different words here"] * 50)
    other.save(tmp_path / "other")
    bad(ft + ["--task", str(toy_csv), "--finetune.tokenizer", str(tmp_path / "other")], capsys,
        "does not match the checkpoint's vocabulary", out)
    bad(ft + ["--task", str(toy_csv), "--finetune.objective", "L4"], capsys, "unknown objective", out)
    bad(ft + ["--task", str(toy_csv), "--finetune.freeze", "7"], capsys, "the model has 2 blocks", out)
    bad(ft + ["--task", str(toy_csv), "--finetune.pool", "max"], capsys, "unknown pooling 'max'", out)
    bad(ft + ["--task", str(toy_csv), "--finetune.pool", "cls"], capsys, "a decoder has no [CLS]", out)
    # a fine-tuned run: unseen labels and empty texts at use time
    run = tmp_path / "ft"
    assert main(["finetune", "--init", str(init), "--task", str(toy_csv), "--finetune.epochs", "1", "--train.batch-size", "64",
                 "--out", str(run)]) == 0
    unseen = write_csv(tmp_path / "unseen.csv", [("good film", "pos"), ("meh", "neutral")])
    bad(["evaluate", "--run", str(run), "--task", str(unseen)], capsys, "label 'neutral' was not seen in training")
    bad(["classify", "--run", str(run), ""], capsys, "empty text")
    bad(["classify", "--run", str(init), "good"], capsys, "not a fine-tuned run")


def test_long_texts_are_truncated_with_one_warning(toks, tmp_path, capsys):
    init = make_run(tmp_path / "gpt", True, toks[True])
    rows = [(" ".join(["good" if i % 2 else "bad"] + ["film"] * (5 + 40 * (i % 3 == 0))) + f" {i}",
             "pos" if i % 2 else "neg") for i in range(60)]  # every third text is over the 32-token window
    f = write_csv(tmp_path / "long.csv", rows)
    capsys.readouterr()
    assert main(["finetune", "--init", str(init), "--task", str(f), "--finetune.epochs", "1", "--out",
                 str(tmp_path / "ft")]) == 0
    err = capsys.readouterr().err
    assert err.count("were truncated") == 1
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["truncated"] == 20


def test_transfer_experiment_grid_table_and_plot(toks, tmp_path, toy_csv, capsys):
    from pretune.recipes.transfer import run_transfer_experiment
    runs = {"tiny-gpt": make_run(tmp_path / "gpt", True, toks[True]),
            "tiny-bert": make_run(tmp_path / "bert", False, toks[False])}
    res = run_transfer_experiment(runs, tmp_path / "transfer", sizes=(16,), task=str(toy_csv), progress=False)
    assert len(res["rows"]) == 2 * 3
    assert {(r["model"], r["variant"], r["labels"]) for r in res["rows"]} == {
        (m, v, 16) for m in runs for v in ("pretrained", "scratch", "pretrained+L3")}
    assert res["majority_baseline"] == pytest.approx(0.5)
    out = capsys.readouterr().out
    assert "estimated running time" in out and "| majority class |" in out and "pre-training buys tiny-gpt" in out
    assert (tmp_path / "transfer" / "transfer.png").stat().st_size > 0
    # no training checkpoints are kept per cell, only each model's kept classifier (weights alone);
    # a rerun reuses every finished cell
    weights = sorted(p for p in (tmp_path / "transfer").rglob("*.safetensors") if p.name != "rng.safetensors")
    assert [str(p.parents[2].relative_to(tmp_path / "transfer")) for p in weights] == [
        "tiny-bert/pretrained/n16-s0", "tiny-gpt/pretrained/n16-s0"]
    for p in weights:  # at the step the cell was tested at
        assert p.parent.name == f"step-{json.loads((p.parents[2] / 'results.json').read_text())['best_step']:06d}"
    again = run_transfer_experiment(runs, tmp_path / "transfer", sizes=(16,), task=str(toy_csv), progress=False)
    assert again["rows"] == res["rows"] and "estimated running time" not in capsys.readouterr().out
    # the decoder reads its last token, the encoder the mean of its tokens; a cell an earlier
    # recipe left with another head is fine-tuned again, the others are reused
    heads = {p.parent.relative_to(tmp_path / "transfer").parts[0]: json.loads(p.read_text())["finetune"]["head"]
             for p in (tmp_path / "transfer").rglob("run.json")}
    assert heads == {"tiny-gpt": "last", "tiny-bert": "mean"}
    old = tmp_path / "transfer" / "tiny-bert" / "pretrained" / "n16-s0" / "run.json"
    cfg = json.loads(old.read_text())
    cfg["finetune"]["head"] = "cls"
    old.write_text(json.dumps(cfg))
    run_transfer_experiment(runs, tmp_path / "transfer", sizes=(16,), task=str(toy_csv), progress=False)
    assert "1 to do" in capsys.readouterr().out
    assert json.loads(old.read_text())["finetune"]["head"] == "mean"


def test_the_grid_tests_the_final_weights_and_skips_the_cells_it_is_told(toks, tmp_path, toy_csv, capsys):
    """Each cell is validated once, at its final step, and those weights are tested (issue 20: the
    best of four by validation loss picked undertrained weights at 100 labels); a cell left by the
    earlier four-evaluation recipe is run again; `skip` leaves (model, variant, labels) cells out."""
    from pretune.recipes.transfer import run_transfer_experiment
    runs = {"tiny-gpt": make_run(tmp_path / "gpt", True, toks[True])}
    res = run_transfer_experiment(runs, tmp_path / "t", sizes=(16, 32), task=str(toy_csv), progress=False,
                                  variants=("pretrained", "scratch"), skip={("tiny-gpt", "scratch", 32)})
    assert sorted((r["variant"], r["labels"]) for r in res["rows"]) == [
        ("pretrained", 16), ("pretrained", 32), ("scratch", 16)]
    cell = tmp_path / "t" / "tiny-gpt" / "pretrained" / "n16-s0"
    vals = [json.loads(l)["step"] for l in (cell / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    done = json.loads((cell / "results.json").read_text())
    assert vals == [done["steps"]] and done["best_step"] == done["steps"]
    cfg = json.loads((cell / "run.json").read_text())
    cfg["train"]["eval_every"] = 1  # as an earlier recipe left it
    (cell / "run.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    run_transfer_experiment(runs, tmp_path / "t", sizes=(16, 32), task=str(toy_csv), progress=False,
                            variants=("pretrained", "scratch"), skip={("tiny-gpt", "scratch", 32)})
    assert "(1 to do;" in capsys.readouterr().out


def _by_hand(run, text):
    """P(y | text) from the run's saved weights, read by hand: the safetensors tensors, a fresh
    Transformer for h_n, then the summary (h at the last token for a decoder, the mean over the
    tokens for an encoder, as run.json's head says) and softmax(summary W_y^T + b)."""
    from safetensors.torch import load_file
    from pretune.tokenizer.core import Tokenizer

    d = json.loads((run / "run.json").read_text())
    cfg = ModelConfig.from_dict(d["model"])
    ck = run / "checkpoints" / f"step-{json.loads((run / 'results.json').read_text())['best_step']:06d}"
    w = load_file(str(ck / "model.safetensors"))
    body = Transformer(cfg)
    missing, unexpected = body.load_state_dict({k[5:]: v for k, v in w.items() if k.startswith("body.")},
                                               strict=False)
    # the tied W_e is stored once, under one of its names; loading it there sets both
    assert not unexpected and len(missing) <= 1
    assert set(missing) <= {"wte.weight", "lm_head.weight", "lm_head.decoder.weight"}
    assert body.wte.weight is (body.lm_head.weight if cfg.causal else body.lm_head.decoder.weight)
    tok = Tokenizer.load(run)
    x = tok.encode_batch([text], add_special_tokens=False, parse_special=False)[0]
    if cfg.causal:
        ids = [tok.bos_id if tok.bos_id is not None else tok.eos_id, *x, tok.eos_id]
    else:
        ids = [tok.cls_id, *x, tok.sep_id]
    with torch.no_grad():
        segments = None if cfg.causal else torch.zeros(1, len(ids), dtype=torch.long)
        h = body.eval()(torch.tensor([ids]), segment_ids=segments)[0]
        summary = {"last": h[-1], "mean": h.mean(0)}[d["finetune"]["head"]]
        return (summary @ w["head.out.weight"].T + w["head.out.bias"]).softmax(-1).tolist()


def test_the_transfer_experiment_keeps_a_classifier_that_classify_can_use(toks, tmp_path, toy_csv, capsys):
    """The grid keeps no training checkpoints, but it keeps the tested weights of each model's
    pre-trained cell at the largest labelled size: `classify` works there and gives what a by-hand
    forward on those saved weights gives, and `evaluate` reproduces the cell's own test result."""
    from pretune.recipes.transfer import run_transfer_experiment
    runs = {"tiny-gpt": make_run(tmp_path / "gpt", True, toks[True]),
            "tiny-bert": make_run(tmp_path / "bert", False, toks[False])}
    res = run_transfer_experiment(runs, tmp_path / "transfer", sizes=(16, 32), task=str(toy_csv), progress=False,
                                  variants=("pretrained", "scratch"))
    out = capsys.readouterr().out
    for m in runs:
        run = tmp_path / "transfer" / m / "pretrained" / "n32-s0"
        assert res["classifiers"][m] == str(run) and f"pretune classify --run {run}" in out
        assert main(["classify", "--run", str(run), "a great film", "the plot was awful", "--json-out"]) == 0
        got = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
        for rec, text in zip(got, ["a great film", "the plot was awful"]):
            want = _by_hand(run, text)
            assert [rec["probabilities"][k] for k in ("neg", "pos")] == pytest.approx(want, abs=1e-4)
            assert rec["label"] == ("neg", "pos")[int(want[1] > want[0])]
        assert main(["evaluate", "--run", str(run), "--json-out"]) == 0
        ev = json.loads(capsys.readouterr().out.splitlines()[-1])
        own = json.loads((run / "results.json").read_text())["test"]
        assert ev["accuracy"] == own["accuracy"] and ev["confusion"] == own["confusion"]
    # only those cells hold weights, and weights only: no optimizer state, one checkpoint each
    kept = sorted(p.parent.parent.parent.relative_to(tmp_path / "transfer")
                  for p in (tmp_path / "transfer").rglob("model.safetensors"))
    assert [str(p) for p in kept] == ["tiny-bert/pretrained/n32-s0", "tiny-gpt/pretrained/n32-s0"]
    assert not list((tmp_path / "transfer").rglob("optimizer.safetensors"))
    # a rerun reuses every cell; a kept cell whose weights are gone (an older demo) is run again
    run_transfer_experiment(runs, tmp_path / "transfer", sizes=(16, 32), task=str(toy_csv), progress=False,
                            variants=("pretrained", "scratch"))
    assert "estimated running time" not in capsys.readouterr().out
    import shutil
    shutil.rmtree(tmp_path / "transfer" / "tiny-gpt" / "pretrained" / "n32-s0" / "checkpoints")
    again = run_transfer_experiment(runs, tmp_path / "transfer", sizes=(16, 32), task=str(toy_csv), progress=False,
                                    variants=("pretrained", "scratch"))
    assert "(1 to do;" in capsys.readouterr().out
    assert [{**r, "seconds": 0} for r in again["rows"]] == [{**r, "seconds": 0} for r in res["rows"]]  # deterministic
    assert main(["classify", "--run", res["classifiers"]["tiny-gpt"], "a great film"]) == 0


def test_the_demo_ends_with_a_classifier_that_classify_can_use(toks, tmp_path, toy_csv, monkeypatch, capsys):
    """`pretune demo` (pre-training stubbed with tiny random runs, the grid shrunk to the toy task,
    no MiniLM or SmolLM2) prints its one table and ends with the commands that use its runs: the
    classify command names a fine-tuned run that `classify` can use."""
    import shlex

    import pretune.data.loaders as shards
    import pretune.recipes.demo as demo
    import pretune.recipes.others as others
    import pretune.recipes.paradigm as paradigm

    def fake_pretrain(cfg, tc, data, out):
        make_run(out, cfg.causal, toks[cfg.causal])
        return {"val_loss": 5.0}
    real = paradigm.run_paradigm
    monkeypatch.setattr(demo, "pretrain", fake_pretrain)
    monkeypatch.setattr(demo, "default_data_dir", lambda tok: tmp_path / "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    monkeypatch.setattr(shards, "unigram_entropy", lambda *a, **k: 6.0)
    monkeypatch.setattr(demo, "_show", lambda runs, smol=None: None)
    monkeypatch.setattr(others, "smollm2", lambda: None)
    monkeypatch.setattr(paradigm, "run_paradigm", lambda runs, out, smol, full=False, seeds=(0,): real(
        runs, out, smol, sizes=(16,), seeds=seeds, minilm=False, task=str(toy_csv), progress=False))
    demo.demo_cmd(out=tmp_path / "demo")
    out = capsys.readouterr().out
    assert "| bag-of-words logistic regression |" in out and "| bert-mini pre-trained here |" in out
    assert "(SmolLM2 not installed)" in out and "GPT-3 175B: 3,640 PF-days" in out
    assert "time per phase: pre-training gpt-mini " in out and ", fine-tuning grid " in out  # where the 15 min go
    cmds = out.split("== what to try next\n")[1].strip().splitlines()
    classify = shlex.split(cmds[0])
    assert classify[:3] == ["pretune", "classify", "--run"]
    assert classify[3] == str(tmp_path / "demo" / "transfer" / "bert-mini" / "pretrained" / "n16-s0")
    assert main(classify[1:]) == 0
    serve = [c.strip() for c in cmds if c.strip().startswith("pretune serve ")]  # the serving issue's closing line
    assert len(serve) == 1 and str(tmp_path / "demo" / "gpt-mini") in serve[0] and classify[3] in serve[0]


def test_transfer_experiment_leaves_l3_out_for_an_encoder_without_lm_head(toks, tmp_path, toy_csv, capsys):
    """An imported sentence encoder (MiniLM) has no MLM head: its grid is pretrained and scratch only."""
    from pretune.recipes.transfer import run_transfer_experiment
    runs = {"encoder": make_run(tmp_path / "enc", False, toks[False], lm_head=False, nsp_head=False)}
    res = run_transfer_experiment(runs, tmp_path / "t", sizes=(16,), task=str(toy_csv), progress=False)
    assert sorted(r["variant"] for r in res["rows"]) == ["pretrained", "scratch"]
    assert "no LM head, so no pretrained+L3" in capsys.readouterr().out
    with pytest.raises(PretuneError, match="unknown variant 'L4'"):
        run_transfer_experiment(runs, tmp_path / "t", sizes=(16,), task=str(toy_csv), variants=("L4",))


def _summary(cells):
    return [{"model": m, "variant": v, "labels": n, "mean": acc} for m, v, n, acc in cells]


def test_pretraining_gains_are_pretrained_minus_scratch_in_points():
    from pretune.recipes.transfer import gain_lines, pretraining_gains

    s = _summary([("gpt-mini", "pretrained", 100, 0.586), ("gpt-mini", "scratch", 100, 0.497),
                  ("gpt-mini", "pretrained", 1000, 0.565), ("gpt-mini", "scratch", 1000, 0.634),
                  ("gpt-mini", "pretrained+L3", 1000, 0.9)])  # L3 is not part of the gain
    g = pretraining_gains(s)
    assert g["gpt-mini"][100] == pytest.approx(8.9) and g["gpt-mini"][1000] == pytest.approx(-6.9)
    assert gain_lines(s) == ["pre-training buys gpt-mini: +8.9 points at 100 labels; -6.9 points at 1,000 labels"]


def test_the_demo_explains_a_loss_to_scratch_and_says_nothing_otherwise():
    from pretune.recipes.demo import transfer_caveat

    losing = {"bert-mini": {"unigram_entropy": 6.305, "lm_loss": 5.985},
              "transfer": {"summary": _summary([("bert-mini", "pretrained", 1000, 0.504),
                                                ("bert-mini", "scratch", 1000, 0.628)])}}
    note = transfer_caveat(losing, full=False)
    assert "bert-mini" in note and "0.32 nats below" in note and "--full" in note
    assert transfer_caveat(losing, full=True) is None  # the full grid has the real checkpoints beside it
    winning = {"transfer": {"summary": _summary([("bert-mini", "pretrained", 1000, 0.7),
                                                 ("bert-mini", "scratch", 1000, 0.6)])}}
    assert transfer_caveat(winning, full=False) is None
