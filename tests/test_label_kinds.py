"""The user's own splits, regression and multi-label heads, LoRA fine-tuning end to end.
Metrics against scipy / scikit-learn (test-time references) and hand-computed values."""

import csv
import json

import numpy as np
import pytest
import torch

from pretune import fileio
from pretune.cli import main
from pretune.config.model import ModelConfig
from pretune.data.labelled import load_task
from pretune.errors import PretuneError
from pretune.evaluation.classification import choose_threshold, multilabel_metrics, regression_metrics
from pretune.models.transformer import Transformer
from pretune.runs import checkpoint as ckpt
from pretune.tokenizer.vocabularies import train_tokenizer

POS, NEG = ["great", "fun", "superb", "moving"], ["awful", "dull", "boring", "bad"]
NEUTRAL = ["the", "film", "plot", "actor", "scene", "story", "was", "a", "and", "it"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rows(n=200, seed=0):
    """(text, #positive - #negative words, the set of word groups present) per row."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, q = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        words = list(rng.choice(NEUTRAL, size=3)) + list(rng.choice(POS, size=p)) + list(rng.choice(NEG, size=q))
        rng.shuffle(words)
        groups = [g for g, k in (("pos", p), ("neg", q)) if k] or ["none"]
        out.append((" ".join(words) + f" {i}", p - q, "|".join(groups)))
    return out


def write_csv(path, header, data):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(data)
    return path


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("wordpiece", 120, [t for t, _, _ in rows()])


def make_run(path, tok, seed=1):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="tiny", causal=False, vocab_size=tok.vocab_size, vocab_multiple=8, max_seq_len=32,
                      n_layer=2, n_head=2, d_model=32, dropout=0.0, type_vocab_size=2, nsp_head=False,
                      embedding_norm=True, norm_placement="post", mlp="gelu", tokenizer="run")
    path.mkdir(parents=True)
    fileio.atomic_write_json(path / "config.json", {"model": cfg.to_dict()})
    tok.save(path)
    ckpt.save_checkpoint(path, 0, Transformer(cfg))
    return path


# ---- metrics against the references --------------------------------------------------

def test_regression_metrics_match_scipy_and_by_hand():
    from scipy.stats import pearsonr, spearmanr
    t = [1.0, 2.0, 2.0, 3.5, -1.0, 0.0]
    p = [0.5, 2.5, 1.0, 3.0, -0.5, 0.0]
    m = regression_metrics(t, p)
    assert m["mse"] == pytest.approx((0.25 + 0.25 + 1 + 0.25 + 0.25 + 0) / 6)
    assert m["pearson"] == pytest.approx(pearsonr(t, p)[0])
    assert m["spearman"] == pytest.approx(spearmanr(t, p)[0])  # with a tie in t


def test_multilabel_metrics_match_sklearn_and_the_threshold_is_chosen_on_validation():
    from sklearn.metrics import f1_score
    Y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])
    P = np.array([[.9, .2, .6], [.3, .7, .1], [.6, .4, .2], [.1, .2, .45], [.2, .1, .3]])
    for th in (0.3, 0.5, 0.65):
        m = multilabel_metrics(Y, P, th)
        assert m["micro_f1"] == pytest.approx(f1_score(Y, P >= th, average="micro", zero_division=0))
        assert m["macro_f1"] == pytest.approx(f1_score(Y, P >= th, average="macro", zero_division=0))
    # by hand at 0.5: TP 4 (0,0 0,2 1,1 2,0), FP 0, FN 2 (2,1 3,2): micro-F1 = 8 / 10
    assert multilabel_metrics(Y, P, 0.5)["micro_f1"] == pytest.approx(0.8)
    # 0.4 recovers (2,1) and (3,2) with no false positive: the best micro-F1 (1.0), nearest 0.5 among ties
    assert choose_threshold(Y, P) == 0.4


# ---- the user's own splits -------------------------------------------------------------

def test_the_users_splits_are_used_as_given_and_an_unseen_label_is_refused(tmp_path):
    data = [(t, "pos" if y > 0 else "neg") for t, y, _ in rows(60)]
    tr = write_csv(tmp_path / "train.csv", ("text", "label"), data[:40] + data[:2])  # a duplicate kept
    va = write_csv(tmp_path / "val.csv", ("text", "label"), data[40:50])
    te = write_csv(tmp_path / "test.csv", ("text", "label"), data[50:])
    t = load_task(tr, val=va, test=te)
    assert [len(t.train), len(t.val), len(t.test)] == [42, 10, 10]
    assert [e.text for e in t.test] == [r[0] for r in data[50:]]  # in the file's order
    assert t.labels == ["neg", "pos"]
    write_csv(tmp_path / "bad.csv", ("text", "label"), data[50:59] + [("another text", "meh")])
    with pytest.raises(PretuneError, match="test label 'meh' was not seen in training"):
        load_task(tr, val=va, test=tmp_path / "bad.csv")
    with pytest.raises(PretuneError, match="go together"):
        load_task(tr, val=va)
    both = write_csv(tmp_path / "all.csv", ("text", "label", "split"),
                     [(a, y, "train") for a, y in data[:40]] + [(a, y, "validation") for a, y in data[40:50]]
                     + [(a, y, "test") for a, y in data[50:]])
    t2 = load_task(both, split_column="split")
    assert [len(t2.train), len(t2.val), len(t2.test)] == [40, 10, 10]


def test_the_builtin_regression_task_holds_the_real_scores():
    t = load_task("movie-scores")
    ys = [e.label for s in ("train", "val", "test") for e in t.split(s)]
    assert t.kind == "regression" and t.labels == ["score"]
    assert len(ys) == 10_601 and -4 <= min(ys) < -3 and 3 < max(ys) <= 4  # 10,605 rows, 2 texts rated twice
    assert sum(abs(y) < 0.5 for y in ys) > 500  # the neutral snippets the binary task drops are here


def test_regression_on_labels_that_are_not_numbers_is_one_line(tmp_path):
    f = write_csv(tmp_path / "t.csv", ("text", "label"), [(t, "pos") for t, _, _ in rows(20)])
    with pytest.raises(PretuneError, match="regression needs numbers"):
        load_task(f, kind="regression")


# ---- end to end ----------------------------------------------------------------------------

def _ft(init, task, out, *more):
    return main(["finetune", "--init", str(init), "--task", str(task), "--out", str(out), "--train.lr", "3e-3",
                 "--train.batch-size", "16", "--train.device", "cpu", *more])


def test_regression_and_multi_label_fine_tune_with_l2_and_l3_and_evaluate(tok, tmp_path, capsys):
    init = make_run(tmp_path / "bert", tok)
    data = rows(240)
    reg = write_csv(tmp_path / "reg.csv", ("text", "label"), [(t, y) for t, y, _ in data])
    multi = write_csv(tmp_path / "multi.csv", ("text", "label"), [(t, g) for t, _, g in data])
    for objective in ("L2", "L3"):
        out = tmp_path / f"reg-{objective}"
        assert _ft(init, reg, out, "--finetune.label-kind", "regression", "--finetune.objective", objective,
                   "--finetune.epochs", "3" if objective == "L2" else "1") == 0
        res = json.loads((out / "results.json").read_text())
        assert res["kind"] == "regression" and set(res["test"]) >= {"mse", "pearson", "spearman"}
        vals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
        assert res["best_step"] == min(vals, key=lambda r: (r["val_loss"], r["step"]))["step"]  # no accuracy: the loss
        assert res["selected_by"] == "validation loss" and res["best_val_acc"] is None
        if objective == "L2":  # the score is a word count: learnt well above chance
            assert res["test"]["pearson"] > 0.5, res["test"]
        capsys.readouterr()
        assert main(["evaluate", "--run", str(out), "--json-out"]) == 0
        ev = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert ev["mse"] == pytest.approx(res["test"]["mse"], rel=1e-5)
        out = tmp_path / f"multi-{objective}"
        assert _ft(init, multi, out, "--finetune.label-kind", "multi", "--finetune.objective", objective,
                   "--finetune.epochs", "3" if objective == "L2" else "1") == 0
        res = json.loads((out / "results.json").read_text())
        assert res["labels"] == ["neg", "none", "pos"] and 0.05 <= res["threshold"] <= 0.95
        assert set(res["test"]) >= {"micro_f1", "macro_f1"}
        capsys.readouterr()
        assert main(["classify", "--run", str(out), "great fun film", "--json-out"]) == 0
        rec = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert set(rec["probabilities"]) == {"neg", "none", "pos"}


def test_lora_fine_tuning_trains_only_adapters_and_head_and_its_adapter_refuses_another_base(tok, tmp_path, capsys):
    init = make_run(tmp_path / "bert", tok)
    data = [(t, "pos" if y > 0 else "neg") for t, y, _ in rows(240) if y != 0]
    task = write_csv(tmp_path / "t.csv", ("text", "label"), data)
    out = tmp_path / "lora"
    assert _ft(init, task, out, "--finetune.adapter", "lora", "--finetune.lora-rank", "4",
               "--finetune.lora-targets", "q,k,v,o", "--finetune.epochs", "2", "--train.lr", "1e-2") == 0
    res = json.loads((out / "results.json").read_text())
    d = 32
    # per block: q, k, v, o each r (d + d); the head: pooler d*d + d, W_y 2d + 2
    assert res["trainable_params"] == 2 * 4 * 4 * (d + d) + (d * d + d) + (2 * d + 2)
    # the base is untouched: the best checkpoint's body weights are the init's, bit for bit
    from safetensors.torch import load_file
    base = load_file(str(init / "checkpoints" / "step-000000" / "model.safetensors"))
    tuned = load_file(str(out / "checkpoints" / f"step-{res['best_step']:06d}" / "model.safetensors"))
    assert all(torch.equal(tuned[f"body.{k}"], v) for k, v in base.items() if f"body.{k}" in tuned)
    assert any(k.endswith("lora_B.q") and tuned[k].abs().sum() > 0 for k in tuned)  # B moved off 0
    from pretune.models.lora import read_adapter
    tensors, meta = read_adapter(out / "adapter.safetensors")
    from pretune.runs.layout import RunDir
    assert meta["base_sha256"] == RunDir(init).weights_sha256() and meta["rank"] == 4
    assert (out / "adapter.safetensors").stat().st_size < 100_000
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--json-out"]) == 0  # the adapters merged on load
    ev = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ev["accuracy"] == pytest.approx(res["test"]["accuracy"])
    # continuing from the adapter on its own base works; on another base: one line, exit 2, nothing written
    other = make_run(tmp_path / "other", tok, seed=2)
    bad = tmp_path / "bad"
    assert _ft(other, task, bad, "--finetune.adapter", str(out / "adapter.safetensors")) == 2
    err = capsys.readouterr().err
    assert "another base" in err and "Traceback" not in err and not bad.exists()


# ---- export of a fine-tuned classifier ------------------------------------------------------

def _small(**kw):
    return ModelConfig(**{**dict(name="small", vocab_size=300, max_seq_len=32, n_layer=2, n_head=4, d_model=32,
                                 dropout=0.0, lm_head=False), **kw})


_BERT = dict(causal=False, norm_placement="post", embedding_norm=True, mlp="gelu", type_vocab_size=2,
             norm_eps=1e-12, tokenizer="bert-uncased")
_LLAMA = dict(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, n_kv_head=2, d_ff=48, rope_theta=500.0)
EXPORTS = {  # name: (config, pool, head bias, kind, LoRA targets or None)
    "bert": (_small(**_BERT), "cls", True, "single", None),
    "bert-lora-regression": (_small(**_BERT), "cls", True, "regression", "q,v,up"),
    "gpt2-multi": (_small(lm_head=True), "last", False, "multi", None),
    "llama-lora": (_small(**_LLAMA), "last", False, "single", "q,k,v,o,gate,down"),
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_an_exported_classifier_gives_the_same_probabilities_in_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    from pretune.interop.hf_classifier import export_classifier
    from pretune.models.heads import Classifier
    from pretune.models.lora import apply_lora, lora_modules, merge_lora
    c, pool, bias, kind, targets = EXPORTS[name]
    torch.manual_seed(3)
    labels = ["a", "b", "c"] if kind != "regression" else ["score"]
    model = Classifier(Transformer(c), len(labels), pool=pool, kind=kind, bias=bias)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if targets:
        apply_lora(model.body, rank=2, alpha=4.0, dropout=0.0, targets=targets)
        with torch.no_grad():
            for _, m in lora_modules(model):
                for t in m.lora_B:
                    m.lora_B[t].normal_(0, 0.3, generator=g)
    model.eval()
    ids = torch.randint(1, c.vocab_size, (3, 11), generator=g)
    lengths = torch.tensor([11, 11, 11])
    with torch.no_grad():
        seg = torch.zeros_like(ids) if not c.causal else None
        ours = model.head.predictions(model(ids, torch.ones_like(ids, dtype=torch.bool), lengths, seg)[0])
    merge_lora(model)
    out = export_classifier(model, None, tmp_path / "hf", {"name": "t", "labels": labels, "kind": kind})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["problem_type"] == {"single": "single_label_classification", "regression": "regression",
                                   "multi": "multi_label_classification"}[kind]
    assert cfg["id2label"] == {str(i): n for i, n in enumerate(labels)} and (out / "README.md").is_file()
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(ref).__name__ == cfg["architectures"][0]
    with torch.no_grad():  # no pad token without a tokenizer: one text at a time
        theirs = torch.cat([ref(input_ids=ids[i:i + 1]).logits for i in range(3)])
    theirs = {"single": theirs.softmax(-1), "multi": theirs.sigmoid(), "regression": theirs}[kind]
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_a_head_hugging_face_cannot_express_is_refused_in_one_line(tok, tmp_path, capsys):
    init = make_run(tmp_path / "bert", tok)
    data = [(t, "pos" if y > 0 else "neg") for t, y, _ in rows(120)]
    task = write_csv(tmp_path / "t.csv", ("text", "label"), data)
    out = tmp_path / "mean"
    assert _ft(init, task, out, "--finetune.pool", "mean", "--finetune.epochs", "1") == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--finetune.pool cls" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


def test_a_lora_run_exports_merged_and_transformers_agrees_on_real_text(tok, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    init = make_run(tmp_path / "bert", tok)
    data = [(t, "pos" if y > 0 else "neg") for t, y, _ in rows(120)]
    task = write_csv(tmp_path / "t.csv", ("text", "label"), data)
    out = tmp_path / "lora"
    assert _ft(init, task, out, "--finetune.adapter", "lora", "--finetune.epochs", "1") == 0
    assert json.loads((out / "run.json").read_text())["train"]["lr"] == 3e-3  # a given --train.lr wins
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    texts = ["great fun film", "the plot was dull and bad"]
    assert main(["classify", "--run", str(out), *texts, "--json-out"]) == 0
    ours = [json.loads(l)["probabilities"] for l in capsys.readouterr().out.splitlines()]
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    cfg = ref.config
    assert cfg.id2label == {0: "neg", 1: "pos"} and cfg.pad_token_id == tok.pad_id
    for text, p in zip(texts, ours):
        ids = [tok.cls_id, *tok.encode(text, add_special_tokens=False), tok.sep_id]
        with torch.no_grad():
            q = ref(input_ids=torch.tensor([ids])).logits.softmax(-1)[0]
        assert abs(q[1].item() - p["pos"]) <= 1e-4  # classify rounds to 4 places


def test_a_gpt2_export_pads_with_its_own_token_and_transformers_agrees_on_a_padded_batch(tmp_path):
    """GPT-2's BPE has only <|endoftext|>, the extract token that ends every text: the export adds
    <|padding|> (one more embedding row) as pad_token_id, so transformers' GPT2ForSequenceClassification
    reads the last real token of every row of a right-padded batch, and its probabilities equal
    pretune's on each text alone (1e-5)."""
    transformers = pytest.importorskip("transformers")
    from pretune.interop.hf_classifier import PAD, export_classifier
    from pretune.models.heads import Classifier
    from pretune.tokenizer.vocabularies import gpt2_tokenizer
    tok = gpt2_tokenizer()
    c = _small(vocab_size=tok.vocab_size)
    torch.manual_seed(5)
    model = Classifier(Transformer(c), 2, pool="last", kind="single", bias=False)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    texts = ["a fine film", "the plot was dull, slow and far too long for anyone", "bad"]
    rows_ = [tok.encode(t, add_special_tokens=False) + [tok.eos_id] for t in texts]
    with torch.no_grad():
        ours = torch.cat([model.head.predictions(model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.bool),
                                                       torch.tensor([len(r)]), None)[0]) for r in rows_])
    out = export_classifier(model, tok, tmp_path / "hf", {"name": "t", "labels": ["neg", "pos"], "kind": "single"})
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    pid = ref.config.pad_token_id
    assert type(ref).__name__ == "GPT2ForSequenceClassification" and pid == tok.vocab_size != tok.eos_id
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert hf_tok.convert_tokens_to_ids(PAD) == pid and ref.config.vocab_size == tok.vocab_size + 1
    n = max(map(len, rows_))
    ids = torch.tensor([r + [pid] * (n - len(r)) for r in rows_])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows_])
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).logits.softmax(-1)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert "pad" in (out / "README.md").read_text()


# ---- the defaults from measurements ------------------------------------------------------

def _defaults_table():
    """docs/finetuning.md's "Resolved defaults" table: (family, band) -> (pool, lr, batch, epochs)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "finetuning.md").read_text()
    section = text.split("#### Resolved defaults", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in ("encoder", "decoder"):
            rows[(cells[0], cells[1])] = (cells[2], float(cells[3]), int(cells[4]), float(cells[5]))
    return rows


@pytest.mark.parametrize("name, band, has_pooler, pool", [
    ("minilm", "10M-100M", False, "mean"),   # all-MiniLM-L6-v2's shape: 22.6M, no NSP pooler
    ("bert-mini", "10M-100M", True, "cls"),  # 11.2M, pre-trained with NSP
    ("bert-base", "other", True, "cls"),     # 110M: BERT's published recipe
    ("tiny-bert", "other", False, "cls"),    # below every band
    ("gpt-mini", "any", False, "last"),
    ("gpt2", "any", False, "last")])
def test_the_resolved_fine_tuning_defaults_are_the_documented_table(name, band, has_pooler, pool):
    from pretune.config.presets import preset
    from pretune.config.training_recipes import recipe_for
    from pretune.models.heads import default_pooling
    from pretune.tasks.config import default_pool, resolved_recipe
    cfgs = {"minilm": ModelConfig(name="minilm", causal=False, vocab_size=30522, max_seq_len=512, n_layer=6, n_head=12,
                                  d_model=384, d_ff=1536, type_vocab_size=2, norm_placement="post", embedding_norm=True,
                                  mlp="gelu", lm_head=False),
            "tiny-bert": _small(**_BERT)}
    cfg = cfgs[name] if name in cfgs else preset(name)
    family = "decoder" if cfg.causal else "encoder"
    want = _defaults_table()[(family, band)]
    r = resolved_recipe(cfg, recipe_for(cfg, "finetune"))
    got_pool = default_pool(cfg, has_pooler) or default_pooling(cfg.causal, "classify")
    assert (got_pool, r["lr"], r["batch_size"], r["epochs"]) == (pool, *want[1:])
    assert pool in want[0]  # the table's pool cell names it ("mean without an NSP pooler, else cls")


def test_a_lora_run_without_lr_takes_loras_own(tok, tmp_path):
    """No --train.lr: a tiny encoder is in no band, so BERT's recipe (batch 32, 3 epochs) with Hu et
    al.'s LoRA lr 5e-4 (full fine-tuning of it: BERT's 5e-5)."""
    init = make_run(tmp_path / "bert", tok)
    task = write_csv(tmp_path / "t.csv", ("text", "label"), [(t, "pos" if y > 0 else "neg") for t, y, _ in rows(60)])
    out = tmp_path / "lora"
    assert main(["finetune", "--init", str(init), "--task", str(task), "--out", str(out), "--train.device", "cpu",
                 "--finetune.adapter", "lora", "--finetune.train-examples", "32"]) == 0
    tc = json.loads((out / "run.json").read_text())["train"]
    assert (tc["lr"], tc["batch_size"], json.loads((out / "run.json").read_text())["finetune"]["epochs"]) == (5e-4, 32, 3)


def _lora_table():
    """docs/finetuning.md's "Resolved LoRA defaults": (family, band) -> (lr, batch, epochs)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "finetuning.md").read_text()
    section = text.split("#### Resolved LoRA defaults", 1)[1].split("\n#", 1)[0].split("\n\n(", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] in ("encoder", "decoder"):
            rows[(cells[0], cells[1])] = (float(cells[2]), int(cells[3]), float(cells[4]))
    return rows


@pytest.mark.parametrize("name, band", [
    ("minilm", "10M-100M"), ("bert-base", "other"), ("gpt-mini", "other"),
    ("gpt2", "100M-400M"),      # 124M: the band is by family and size, not by name
    ("smollm2", "100M-400M"),   # SmolLM2-135M's shape: the measured model
    ("gpt2-medium", "100M-400M"), ("gpt2-large", "other")])  # 355M in, 774M out
def test_the_resolved_lora_defaults_are_the_documented_table(name, band):
    from pretune.config.presets import preset
    from pretune.config.training_recipes import recipe_for
    from pretune.tasks.config import resolved_recipe
    cfgs = {"minilm": ModelConfig(name="minilm", causal=False, vocab_size=30522, max_seq_len=512, n_layer=6, n_head=12,
                                  d_model=384, d_ff=1536, type_vocab_size=2, norm_placement="post", embedding_norm=True,
                                  mlp="gelu", lm_head=False),
            "smollm2": ModelConfig(name="smollm2", vocab_size=49152, max_seq_len=2048, n_layer=30, n_head=9,
                                   n_kv_head=3, d_model=576, d_ff=1536, norm="rmsnorm", mlp="swiglu", position="rotary",
                                   bias=False, tie_embeddings=True)}
    cfg = cfgs[name] if name in cfgs else preset(name)
    want = _lora_table()[("decoder" if cfg.causal else "encoder", band)]
    r = resolved_recipe(cfg, recipe_for(cfg, "finetune"), "lora")
    assert (r["lr"], r["batch_size"], r["epochs"]) == want
    assert resolved_recipe(cfg, recipe_for(cfg, "finetune"))["lr"] != r["lr"]  # full fine-tuning keeps its own
