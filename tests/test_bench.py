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

def test_the_gpu_checks_n_is_flop_params_of_gpt2_small_by_hand():
    # GPT-2 small holds 124,439,808 parameters (the released checkpoint, W_e tied, V = 50,257); minus the
    # 1024 x 768 position table; plus the 47 padding rows of the output projection (V padded to 50,304,
    # the rows the matmul multiplies through): 123,653,376 + 36,096 = 123,689,472 (docs/compute.md's N).
    from pretune.config.presets import preset
    from pretune.models.counting import flop_params

    n = 124_439_808 - 1024 * 768 + 47 * 768
    assert flop_params(preset("gpt2")) == n == 123_689_472
    assert _gpu_check().flop_counts(preset("gpt2"), 1024)[0] == n
    assert not hasattr(harness, "six_n")  # one definition of N: the benchmarks use flop_params too


def test_the_gpu_checks_n_of_a_mixture_of_experts_counts_the_active_experts_only():
    """gpt4-moe (L = 120, d = 10,752, 16 experts, top 2, GELU 4d experts, biases, LayerNorms, V = 100,277
    padded to 100,288, tied): per block attention 4d² + 4d, two LayerNorms 4d, the router 16d, and the
    two routed experts 2 (8d² + 5d): 20d² + 34d = 2,312,475,648; 120 blocks 277,497,077,760, + the final
    LayerNorm 21,504 + the output projection 100,288 d = 1,078,296,576: N = 278,575,395,840.
    Counting all 16 experts (the removed six_n did) would add 120 · 14 (8d² + 5d) = 1.55e12."""
    from pretune.config.presets import preset

    d = 10_752
    active = 120 * (20 * d * d + 34 * d) + 2 * d + 100_288 * d
    assert active == 278_575_395_840
    n, fpt, fpt_6n = _gpu_check().flop_counts(preset("gpt4-moe"), 8192)
    assert n == active
    assert fpt_6n == 6 * active and fpt == 6 * active + 12 * 120 * 8192 * d


def test_mfu_arithmetic_by_hand():
    g = _gpu_check()
    n = 123_653_376
    # 6·N + 12·L·T·d = 741,920,256 + 12·12·1024·768 = 741,920,256 + 113,246,208
    assert g.flops_per_token(n, 12, 1024, 768) == 855_166_464
    assert g.flops_per_token(n, 12, 1024, 768, attention=False) == 741_920_256
    # 400,000 tokens/s on an H100 SXM: 3.4207e14 / 9.894e14 = 34.57%
    assert g.mfu(400_000, 855_166_464, 989.4e12) == pytest.approx(0.345731, rel=1e-5)
    # the datasheets' dense bf16 figures (half the 2:4-sparsity headline), read from the hardware table
    assert g.dense_bf16_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)  # 1,978.9 / 2
    assert g.dense_bf16_peak("NVIDIA H200") == pytest.approx(989.4e12)
    assert g.dense_bf16_peak("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert g.dense_bf16_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert g.dense_bf16_peak("NVIDIA H100 NVL") == pytest.approx(835.5e12)  # 1,671 / 2
    assert g.dense_bf16_peak("NVIDIA L40S") == pytest.approx(362.05e12)
    assert g.dense_bf16_peak("NVIDIA L4") == pytest.approx(121e12)  # 242 / 2
    assert g.dense_bf16_peak("NVIDIA GeForce GTX 1080") is None
    assert not hasattr(g, "DENSE_BF16_PEAK")  # no table of its own


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


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_quantized_generation_tiny_round_has_its_roofline(weights):
    r = _well_formed(cases.generation("tiny", batch=1, new_tokens=6, prompt=4, rounds=1, warmup=0, weights=weights),
                     "tokens_per_s")
    assert r["weights"] == weights and r["bandwidth_gb_s"] > 0
    # the roofline is bandwidth over the bytes a token reads: weights (int8 W_e 512x64 + scales, ...) and the KV cache
    assert r["roofline_tokens_per_s"] == pytest.approx(r["bandwidth_gb_s"] * 1e9 / r["bytes_per_token"])
    assert r["bytes_per_token"] < 0.6 * cases.generation("tiny", batch=1, new_tokens=6, prompt=4, rounds=1,
                                                          warmup=0)["bytes_per_token"]


def test_bench_writes_json_and_regenerates_the_docs_table(monkeypatch, tmp_path, capsys):
    from pretune.cli import main
    from pretune_bench import report

    tiny = [("generate tiny b1 int8", cases.generation,
             dict(shape="tiny", batch=1, new_tokens=4, prompt=4, rounds=1, warmup=0, weights="int8"))]
    monkeypatch.setattr(suite, "suite_plan", lambda quick=False: tiny)
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nprose before\n")
    assert main(["bench", "--out", str(tmp_path / "b.json"), "--docs", str(doc)]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["machine"]["cores"] and data["date"] and data["results"][0]["weights"] == "int8"
    text = doc.read_text()
    assert text.startswith("# Performance\n\nprose before") and text.count(report.BEGIN) == 1
    assert "greedy generation, tiny, batch 1, pretune int8" in text and data["date"] in text
    # again, from the JSON alone: the block is replaced, not appended
    data["date"] = "2001-01-01 00:00 UTC"
    (tmp_path / "b.json").write_text(json.dumps(data))
    assert main(["bench", "--from-json", str(tmp_path / "b.json"), "--docs", str(doc)]) == 0
    text = doc.read_text()
    assert text.count(report.BEGIN) == 1 and "2001-01-01" in text


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
