"""The benchmarks run and report well-formed results; the GPU check's MFU arithmetic.

No timing is asserted here (speed targets are benchmark results, docs/performance.md).
What is asserted: each benchmark completes one tiny round and returns JSON-able
figures, both sides compute the same thing on the same weights (the reference is
Hugging Face's implementation), and the MFU arithmetic matches hand computation.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from pretune_bench import cases, harness, suite

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _well_formed(r: dict, unit: str):
    r = json.loads(json.dumps(r))  # JSON round trip: plain numbers and strings only
    assert r["unit"] == unit and r["rounds"] >= 1 and r["threads"] >= 1
    for side in ("pretune", "reference"):
        s = r[side]
        assert len(s["times_s"]) == r["rounds"]
        assert s["median_s"] > 0 and s[unit] > 0 and math.isfinite(s[unit])
    assert r["ratio"] == pytest.approx(r["reference"]["median_s"] / r["pretune"]["median_s"])
    assert isinstance(harness.describe(r), str)
    return r


# ---- the GPU check's arithmetic ------------------------------------------------

def test_six_n_of_gpt2_small_by_hand():
    # GPT-2 small holds 124,439,808 parameters (the released checkpoint, W_e tied);
    # minus the 1024 x 768 position table = N of 6·N. Vocabulary padding is not counted.
    from pretune.config.presets import preset

    assert harness.six_n(preset("gpt2")) == 124_439_808 - 1024 * 768


def test_mfu_arithmetic_by_hand():
    g = _gpu_check()
    n = 123_653_376
    # 6·N + 12·L·T·d = 741,920,256 + 12·12·1024·768 = 741,920,256 + 113,246,208
    assert g.flops_per_token(n, 12, 1024, 768) == 855_166_464
    assert g.flops_per_token(n, 12, 1024, 768, attention=False) == 741_920_256
    # 400,000 tokens/s on an H100 SXM: 3.4207e14 / 9.89e14 = 34.59%
    assert g.mfu(400_000, 855_166_464, 989e12) == pytest.approx(0.345871, rel=1e-5)
    assert g.dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert g.dense_bf16_peak("NVIDIA H200") == 989e12
    assert g.dense_bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert g.dense_bf16_peak("NVIDIA H100 PCIe") == 756e12


def test_gpu_check_runs_its_cpu_fallback(tmp_path, monkeypatch):
    """The CPU fallback end to end, with the clock and the peak picked by hand so that every
    figure it prints can be worked out here from gpt-mini's layer sizes."""
    g = _gpu_check()
    # gpt-mini at T = 16: L = 4, d = 256, 4d = 1,024, V = 8,192 (tied), biases and LayerNorms.
    # One block: QKV 256*768 + 768 = 197,376; attention out 256*256 + 256 = 65,792;
    # MLP in 256*1024 + 1024 = 263,168; MLP out 1024*256 + 256 = 262,400; two LayerNorms 1,024:
    # 789,760. Four blocks 3,159,040 + final LayerNorm 512 + W_e 8,192*256 = 2,097,152:
    # N = 5,256,704 (the 16 x 256 position table is not multiplied through, so not counted).
    n = 5_256_704
    per_token = 6 * n + 12 * 4 * 16 * 256  # 31,540,224 + 196,608 = 31,736,832
    clock = iter([0.0, 0.1, 1.0, 1.25])  # warm-up 0.1 s; one timed step of 16 tokens in 0.25 s
    monkeypatch.setattr(g, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    import pretune.hardware.peak
    monkeypatch.setattr(pretune.hardware.peak, "measured_peak", lambda *a, **k: 1e10)  # a 10 GFLOP/s "CPU"
    out = g.main(["--cpu", "--steps", "1", "--warmup", "1", "--batch", "1", "--seq", "16",
                  "--precision", "fp32", "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["tokens_per_s"] == pytest.approx(out["tokens_per_s"])
    assert out["params_6n"] == n and math.isfinite(out["loss"])
    assert out["tokens_per_s"] == pytest.approx(64.0)  # 16 tokens / 0.25 s
    assert out["model_tflops"] == pytest.approx(64 * 31_736_832 / 1e12)  # 2.0312e-3 TFLOP/s
    assert out["mfu"] == pytest.approx(2_031_157_248 / 1e10)  # 20.31% of the hand-picked peak
    assert out["mfu_6n"] == pytest.approx(64 * 31_540_224 / 1e10)
    assert out["sync_check"] is None  # the no-sync check needs CUDA (scripts/gpu_check.py)


# ---- each benchmark, one tiny round ----------------------------------------------

def test_gpt_train_tiny_round_matches_the_reference_loss():
    r = _well_formed(cases.gpt_train("tiny", rounds=1, warmup=0, peak=True), "tokens_per_s")
    # same weights, same batch: the losses of pretune and GPT2LMHeadModel agree
    assert r["initial_loss"]["pretune"] == pytest.approx(r["initial_loss"]["reference"], abs=1e-5)
    # the tiny shape (gpt-mini with L = 2, d = 64, 4d = 256, V = 512 tied; B = 2, T = 32): one block
    # QKV 64*192 + 192, out 64*64 + 64, MLP 64*256 + 256 and 256*64 + 64, LayerNorms 256 = 49,984;
    # N = 2 * 49,984 + final LayerNorm 128 + W_e 512*64 = 132,864; 6N = 797,184 FLOPs per token
    assert r["six_n_params"] == 132_864
    assert r["pretune"]["tokens_per_s"] == pytest.approx(2 * 32 / r["pretune"]["median_s"])
    assert r["pretune"]["gflops"] == pytest.approx(r["pretune"]["tokens_per_s"] * 797_184 / 1e9)
    assert r["fraction_of_peak"] > 0 and r["fp32_matmul_peak_gflops"] > 0


def test_gpt_train_bf16_tiny_round():
    r = _well_formed(cases.gpt_train("tiny", precision="bf16", rounds=1, warmup=0), "tokens_per_s")
    assert r["precision"] == "bf16" and r["target"] is None


def test_bf16_against_fp32_tiny_round():
    # (the "compile" variant takes a minute to compile on two cores: benchmarks/bench_train.py --compile)
    r = _well_formed(cases.variant_gain("tiny", "bf16", rounds=1, warmup=0), "tokens_per_s")
    assert r["bench"] == "bf16" and r["setup_s"] is not None


def test_bert_mlm_tiny_round():
    r = _well_formed(cases.bert_mlm("tiny", rounds=1, warmup=0), "tokens_per_s")
    assert 0 < r["masked_fraction"] < 0.5


def test_generation_tiny_round_gives_the_references_tokens():
    r = _well_formed(cases.generation("tiny", batch=2, new_tokens=6, prompt=4, rounds=1, warmup=0), "tokens_per_s")
    assert r["same_tokens_fraction"] == 1.0  # greedy on the same weights: GPT2LMHeadModel.generate's tokens


def test_tokenization_and_loader_tiny_rounds():
    r = _well_formed(cases.tokenization(max_bytes=20_000, rounds=1, warmup=0), "mb_per_s")
    assert r["same_tokens"]
    _well_formed(cases.loader(steps=2, rounds=1, warmup=0), "tokens_per_s")


def test_bench_verb_runs_the_suite(monkeypatch, capsys):
    from pretune.cli import main

    tiny = [("gpt_train tiny", cases.gpt_train, dict(shape="tiny", rounds=1, warmup=0, peak=False))]
    monkeypatch.setattr(suite, "suite_plan", lambda quick=False: tiny)
    main(["bench", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["bench"] == "gpt_train"
    assert main(["bench", "--only", "nothing-like-this"]) == 2


def test_bench_suite_without_transformers_says_which_extra(monkeypatch, capsys):
    """The suite's reference side is Hugging Face transformers, the [bench] extra: without it, one line."""
    from pretune.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails, as when not installed
    assert main(["bench", "--only", "gpt_train"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "pretune: error: the benchmark suite needs Hugging Face transformers (the reference side) "
        "(pretune bench): pip install 'pretune[bench]'"]


def test_alternation_flips_the_order():
    calls = []
    harness.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b"]
