"""The benchmarks run and report well-formed results; the GPU check's MFU arithmetic.

No timing is asserted here (speed targets are benchmark results, docs/performance.md).
What is asserted: each benchmark completes one tiny round and returns JSON-able
figures, both sides compute the same thing on the same weights (the reference is
Hugging Face's implementation), and the MFU arithmetic matches hand computation.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from pretune import speed

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
    assert isinstance(speed.describe(r), str)
    return r


# ---- the GPU check's arithmetic ------------------------------------------------

def test_six_n_of_gpt2_small_by_hand():
    # GPT-2 small holds 124,439,808 parameters (the released checkpoint, W_e tied);
    # minus the 1024 x 768 position table = N of 6·N. Vocabulary padding is not counted.
    from pretune.config import preset

    assert speed.six_n(preset("gpt2")) == 124_439_808 - 1024 * 768


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


def test_gpu_check_runs_its_cpu_fallback(tmp_path):
    g = _gpu_check()
    out = g.main(["--cpu", "--steps", "1", "--warmup", "0", "--batch", "1", "--seq", "16",
                  "--precision", "fp32", "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["tokens_per_s"] == pytest.approx(out["tokens_per_s"])
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] < 1.5 and math.isfinite(out["loss"])
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * 1e12 * out["model_tflops"] / out["tokens_per_s"]
                                       / (out["peak_tflops"] * 1e12))


# ---- each benchmark, one tiny round ----------------------------------------------

def test_gpt_train_tiny_round_matches_the_reference_loss():
    r = _well_formed(speed.gpt_train("tiny", rounds=1, warmup=0, peak=True), "tokens_per_s")
    # same weights, same batch: the losses of pretune and GPT2LMHeadModel agree
    assert r["initial_loss"]["pretune"] == pytest.approx(r["initial_loss"]["reference"], abs=1e-5)
    assert r["pretune"]["gflops"] == pytest.approx(r["pretune"]["tokens_per_s"] * 6 * r["six_n_params"] / 1e9)
    assert r["fraction_of_peak"] > 0 and r["fp32_matmul_peak_gflops"] > 0


def test_gpt_train_bf16_tiny_round():
    r = _well_formed(speed.gpt_train("tiny", precision="bf16", rounds=1, warmup=0), "tokens_per_s")
    assert r["precision"] == "bf16" and r["target"] is None


def test_bf16_against_fp32_tiny_round():
    # (the "compile" variant takes a minute to compile on two cores: benchmarks/bench_train.py --compile)
    r = _well_formed(speed.variant_gain("tiny", "bf16", rounds=1, warmup=0), "tokens_per_s")
    assert r["bench"] == "bf16" and r["setup_s"] is not None


def test_bert_mlm_tiny_round():
    r = _well_formed(speed.bert_mlm("tiny", rounds=1, warmup=0), "tokens_per_s")
    assert 0 < r["masked_fraction"] < 0.5


def test_generation_tiny_round_gives_the_references_tokens():
    r = _well_formed(speed.generation("tiny", batch=2, new_tokens=6, prompt=4, rounds=1, warmup=0), "tokens_per_s")
    assert r["same_tokens_fraction"] == 1.0  # greedy on the same weights: GPT2LMHeadModel.generate's tokens


def test_tokenization_and_loader_tiny_rounds():
    r = _well_formed(speed.tokenization(max_bytes=20_000, rounds=1, warmup=0), "mb_per_s")
    assert r["same_tokens"]
    _well_formed(speed.loader(steps=2, rounds=1, warmup=0), "tokens_per_s")


def test_bench_verb_runs_the_suite(monkeypatch, capsys):
    from pretune.cli import main

    tiny = [("gpt_train tiny", speed.gpt_train, dict(shape="tiny", rounds=1, warmup=0, peak=False))]
    monkeypatch.setattr(speed, "suite_plan", lambda quick=False: tiny)
    main(["bench", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["bench"] == "gpt_train"
    assert main(["bench", "--only", "nothing-like-this"]) == 2


def test_alternation_flips_the_order():
    calls = []
    speed.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b"]
