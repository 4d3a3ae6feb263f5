"""The cost planner against hand-computed figures and the lecture's worked examples.

Every expected value is written out here from the papers' formulas or the
quoted claims, not taken from the code (docs/compute.md walks through each).
"""

import json
import re
import tracemalloc

import pytest

from pretune.cli import main
from pretune.config.presets import preset
from pretune.hardware import peak as peak_mod
from pretune.hardware.peak import device_peak, get_hardware, mfu
from pretune.hardware.table import HARDWARE
from pretune.models.counting import (count_params, flop_params, inference_flops_per_token, train_flops_per_token,
                                     training_flops)
from pretune.planning.cost import (PF_DAY, device_seconds, dollars, energy_cost, energy_kwh, flops_from_pf_days,
                                   implied_mfu, memory, mfu_flag, pf_days, plan, wall_clock_days)
from pretune.training.hooks import MFUHook

DAY = 86400


def close(a, b, rel):
    return abs(a / b - 1) <= rel


# ---- counting and FLOPs, by hand -------------------------------------------------

def test_train_flops_per_token_gpt2_by_hand():
    # GPT-2 small, vocab 50,257 unpadded. Non-embedding (Kaplan's N): 124,439,808 - 50,257*768
    # - 1,024*768 = 85,056,000. N in 6N adds the (tied) output projection 50,257*768 = 38,597,376:
    # 123,653,376 -> 6N = 741,920,256. Attention: 12 * L * T * d = 12*12*1024*768 = 113,246,208.
    cfg = preset("gpt2", vocab_multiple=1)
    assert flop_params(cfg) == 123_653_376
    assert train_flops_per_token(cfg, 1024) == 741_920_256 + 113_246_208
    # inference at a 1,024-token context: 2N + 4*L*c*d = 247,306,752 + 37,748,736
    inf = inference_flops_per_token(cfg, 1024)
    assert inf["total"] == 285_055_488


def test_gpt3_175b_on_300b_tokens_is_3_14e23_flops_3640_pf_days():
    # Brown et al. 2020, table D.1: 3.14e23 FLOPs = 3.64e3 PF-days. N = 12*L*d^2 + V*d
    # = 12*96*12288^2 + 50257*12288 = 173.95e9 + 0.62e9 ~ 174.6e9; 6*174.6e9*300e9 = 3.143e23.
    f = training_flops(preset("gpt3-175b"), 300e9)
    assert close(f["n"], 12 * 96 * 12288 ** 2 + 50257 * 12288, 0.001)
    assert close(f["six_nd"], 3.14e23, 0.005)
    assert close(pf_days(f["six_nd"]), 3640, 0.005)
    # the attention term at T = 2048 adds 12*96*2048*12288*300e9 = 8.70e21 (2.8%)
    assert close(f["attention"], 12 * 96 * 2048 * 12288 * 300e9, 1e-9)
    assert PF_DAY == 8.64e19


def test_activation_and_state_memory_by_hand():
    # Korthikanti et al. 2022: per layer per token 34*d + 5*a*T bytes (16-bit activations).
    # GPT-3 175B at T = 2048: 96 * (34*12288 + 5*96*2048) = 134,479,872, plus fp32 logits 4*50,304.
    m = memory(preset("gpt3-175b"), "bf16", 2048)
    assert m["activations_per_token"] == 134_479_872 + 4 * 50304
    # mixed precision with Adam: 2 + 2 + 12 = 16 bytes per parameter (ZeRO sec. 3.1)
    total = count_params(preset("gpt3-175b"))["total"]
    assert m["train_states"] == 16 * total
    assert close(m["train_states"], 2.79e12, 0.01)
    # KV cache: 2 (K and V) * L * d * 2 bytes = 2*96*12288*2 = 4,718,592 bytes per token
    assert m["kv_cache_per_token"] == 4_718_592


def test_costing_a_1_8t_config_allocates_nothing():
    tracemalloc.start()
    plan(preset("gpt4-moe"), 13e12, "a100", 25000, 0.35)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_bytes < 1_000_000  # a few kB of dicts, not 1.8T weights


# ---- the lecture's figures ------------------------------------------------------

def test_a10g_instances_3000_pf_days_cost_360k_and_why_2_pf_per_s_is_sparse():
    a10g = HARDWARE["a10g"]
    # "8-GPU A10G instances counted at 2 PF/s each": 8 * 250 TFLOP/s, the *sparse* bf16 figure.
    assert 8 * a10g.sparse["bf16"] == 2e15
    assert 8 * a10g.peak["bf16"] == 1e15  # dense
    # 3,000 PF-days at 2 PF/s = 1,500 instance-days; at $240 per instance-day = $360,000.
    inst_days = device_seconds(flops_from_pf_days(3000), 2e15) / DAY
    assert inst_days == pytest.approx(1500)
    usd = dollars(device_hours=inst_days * 24 * 8, usd_per_instance_hour=240 / 24, devices_per_instance=8)
    assert usd == pytest.approx(360_000)
    # dense peak at 100% utilisation doubles it; at a realistic 40% MFU it is $1.8M.
    dense_days = device_seconds(flops_from_pf_days(3000), 1e15, 0.4) / DAY
    assert dense_days * 240 == pytest.approx(1_800_000)


def test_25000_a100_for_100_days_at_1_dollar_is_60m():
    assert dollars(25_000 * 100 * 24, usd_per_device_hour=1.0) == pytest.approx(60e6)


def test_energy_190000_kwh_at_22_cents_and_patterson_gpt3():
    assert energy_cost(190_000, 0.22) == pytest.approx(41_800)
    # Patterson et al. 2021, table 4, GPT-3: 10,000 V100 for 14.8 days at 330 W mean, PUE 1.1
    # -> 1,287 MWh reported; 10000 * 355.2 h * 0.330 kW * 1.1 = 1,289,376 kWh.
    assert close(energy_kwh(10_000 * 14.8 * 24, 330, 1.1), 1_287_000, 0.005)


def test_gpt4_moe_counts_land_on_the_rumoured_totals():
    cfg = preset("gpt4-moe")
    p = count_params(cfg)
    assert close(p["total"], 1.8e12, 0.02)
    assert close(p["active"], 280e9, 0.01)
    # one expert across the 120 layers: 120 * (2*d*4d + 4d + d biases), d = 10752 -> 110.99e9
    d = 10752
    expert = 120 * (8 * d * d + 5 * d)
    assert close(expert, 111e9, 0.001)
    assert p["total"] - p["active"] == 14 * expert  # 14 of 16 experts idle per token
    shared = p["active"] - 2 * expert  # attention (55.5B) + embeddings + norms + routers
    assert close(shared, 55e9, 0.04)
    # inference: about 2 x 280B FLOPs per token, before attention
    assert close(inference_flops_per_token(cfg, 0)["total"], 2 * 280e9, 0.01)


def test_gpt1_claim_of_26_pf_days_in_30_days_on_8_gpus_is_flagged():
    # 26 PF-days / (8 GPUs * 30 days) = 26e15 / 240 = 1.083e14 FLOP/s sustained per GPU
    per_gpu = flops_from_pf_days(26) / (8 * 30 * DAY)
    assert per_gpu == pytest.approx(1.0833e14, rel=1e-3)
    # that is 87% of a V100's dense fp16 tensor peak (125 TFLOP/s; 2018's best) -> implausible,
    # and 6.9x its fp32 peak -> impossible
    m16 = implied_mfu(flops_from_pf_days(26), 8, 30, HARDWARE["v100"].peak["fp16"])
    assert m16 == pytest.approx(0.867, rel=1e-2) and mfu_flag(m16).startswith("implausible")
    m32 = implied_mfu(flops_from_pf_days(26), 8, 30, HARDWARE["v100"].peak["fp32"])
    assert m32 == pytest.approx(6.9, rel=1e-2) and mfu_flag(m32).startswith("impossible")
    # GPT-1's own recipe (Radford et al. 2018: 100 epochs of BooksCorpus, ~1e9 tokens) is
    # 6 * 117e6 * 1e11 = 7e19 FLOPs ~ 0.8 PF-days: 26 is off by more than an order of magnitude.
    est = pf_days(training_flops(preset("gpt1"), 1e11)["six_nd"])
    assert 0.7 < est < 0.9 and 26 / est > 20


def test_bert_large_4_days_on_64_tpu_chips_implies_about_26_percent():
    # Devlin et al. 2019: 1M steps of 256 x 512 ("128,000 tokens/batch") = 1.28e11 tokens on
    # 16 Cloud TPUs = 64 chips (TPU v2, 45 TFLOP/s each) for 4 days.
    # Hand: 6 * 340e6 * 1.28e11 / (64 * 45e12 * 4 * 86400) = 0.262
    flops = training_flops(preset("bert-large"), 1.28e11)["six_nd"]
    m = implied_mfu(flops, 64, 4, get_hardware("tpu-v2").peak_for("bf16"))
    assert close(m, 0.262, 0.03) and mfu_flag(m) is None
    # read as TPU v3 chips (123 TFLOP/s) it would be ~9.6%
    assert close(implied_mfu(flops, 64, 4, HARDWARE["tpu-v3"].peak["bf16"]), 0.096, 0.03)


@pytest.mark.parametrize("days,expected", [(90, 0.360), (100, 0.324)])
def test_gpt4_13t_tokens_on_25000_a100_is_32_to_36_percent_mfu(days, expected):
    # 6 * 280e9 * 13e12 = 2.184e25 FLOPs; 25,000 * 312e12 FLOP/s * days * 86400
    flops = training_flops(preset("gpt4-moe"), 13e12)["six_nd"]
    m = implied_mfu(flops, 25_000, days, HARDWARE["a100"].peak["bf16"])
    assert close(m, expected, 0.01)
    assert mfu_flag(m) is None


def test_wall_clock_inverts_implied_mfu():
    # 1e24 FLOPs on 1,000 devices of 1e15 FLOP/s at 50%: 2e6 s = 23.148 days
    assert wall_clock_days(1e24, 1000, 1e15, 0.5) == pytest.approx(2e6 / DAY)
    assert implied_mfu(1e24, 1000, 2e6 / DAY, 1e15) == pytest.approx(0.5)


# ---- MFU during training ----------------------------------------------------------

@pytest.fixture
def cached_cpu_peak(tmp_path, monkeypatch):
    """A peak cache holding 1e11 fp32 FLOP/s for this machine, so nothing is measured."""
    monkeypatch.setenv("PRETUNE_CACHE", str(tmp_path))
    key = peak_mod.machine_key("cpu")
    (tmp_path / "peak.json").write_text(json.dumps({key: {"device": "cpu", "dtypes": {
        "fp32": {"flops": 1e11, "n": 2048}}}}))
    return 1e11


def test_mfu_uses_datasheet_for_gpus_and_the_measured_peak_for_cpu(cached_cpu_peak):
    assert mfu(78e12, "a100", "bf16") == pytest.approx(0.25)
    value, label = device_peak("cpu", "fp32")
    assert value == 1e11 and "measured" in label
    assert mfu(5e10, "cpu", "fp32") == pytest.approx(0.5)


def test_mfu_hook_logs_flops_and_mfu(cached_cpu_peak):
    cfg = preset("gpt2", vocab_multiple=1)
    hook = MFUHook(cfg, 1024, "fp32")

    class Trainer:
        device, progress = "cpu", False

    hook.on_start(Trainer())
    rec = {"tok_per_s": 100.0}
    hook.on_log(Trainer(), rec)
    assert rec["model_flops_per_s"] == pytest.approx(100 * 855_166_464)  # the hand count above
    assert rec["mfu"] == pytest.approx(100 * 855_166_464 / 1e11)


def test_masked_lm_counts_the_head_only_at_the_masked_positions():
    """BERT-base's MLM head (transform d x d, decoder V x d with V padded to 30,528) runs on 15% of
    the positions, so 85% of its 6 FLOPs per weight are not model FLOPs."""
    cfg = preset("bert-base")
    head = 30_528 * 768 + 768 * 768
    full, sparse = train_flops_per_token(cfg, 512), train_flops_per_token(cfg, 512, predicted=0.15)
    assert full - sparse == pytest.approx(6 * 0.85 * head)
    assert MFUHook(cfg, 512).flops_per_token == pytest.approx(sparse)  # the encoder's default
    gpt = preset("gpt2")
    assert MFUHook(gpt, 1024).flops_per_token == train_flops_per_token(gpt, 1024)


def test_peak_measurement_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETUNE_CACHE", str(tmp_path))
    res = peak_mod.measure_peaks(("fp32",), "cpu", seconds=0.2, progress=False)
    assert res["fp32"]["flops"] > 0
    assert peak_mod.cached_peaks("cpu")["fp32"]["flops"] == res["fp32"]["flops"]


# ---- the command -----------------------------------------------------------------

def _table(out: str) -> dict[str, list[str]]:
    """The rows of `pretune cost`'s table: label -> one cell per model (cells are 2+ spaces apart)."""
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 5:
            rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    """'174.6B' -> 1.746e11, '3,738' -> 3738, '3.14e+23' -> 3.14e23."""
    cell = cell.split()[0].replace(",", "")
    scale = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(cell[-1])
    return float(cell[:-1]) * scale if scale else float(cell)


def test_cost_table_shows_the_published_figures(capsys):
    assert main(["cost", "gpt1", "gpt2-xl", "gpt3-175b", "gpt4-moe", "--tokens", "300e9",
                 "--hardware", "a100", "--gpus", "1024", "--mfu", "0.35"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    total = [_number(c) for c in rows["parameters (total)"]]
    six_nd = [_number(c) for c in rows["FLOPs 6ND"]]
    pf = [_number(c) for c in rows["PF-days"]]
    # GPT-1: "117M parameters" (Radford et al. 2018; 116.6M counted, the 4-figure print is 0.3% off)
    assert close(total[0], 117e6, 0.005)
    # GPT-2 XL: by hand 48 * (12 * 1600^2 + 13 * 1600) + 50,257 * 1600 + 1,024 * 1600 + 3,200
    # = 1,557,611,200 (the released checkpoint), which the paper's Table 2 rounds as 1542M ("1.5B")
    assert close(total[1], 1_557_611_200, 0.0005) and close(total[1], 1542e6, 0.015)
    # GPT-3 175B: Brown et al. 2020, table D.1: 174,600M parameters, 3.14E+23 FLOPs, 3.64E+03 PF-days
    assert close(total[2], 174_600e6, 0.0005)
    assert close(six_nd[2], 3.14e23, 0.005)
    assert close(six_nd[2] / 8.64e19, 3640, 0.005)
    # the PF-days row adds the attention term: 12 * 96 * 2048 * 12288 / (6 * 174.6e9) = 2.77% more
    assert close(pf[2], 3640 * (1 + 12 * 96 * 2048 * 12288 / (6 * 174.6e9)), 0.005)
    # gpt4-moe: the rumoured "about 1.8T" total and "about 280B" active (SemiAnalysis, July 2023)
    assert close(total[3], 1.8e12, 0.02) and close(_number(rows["active per token"][3]), 280e9, 0.01)
    assert "312 TFLOP/s" in out  # which peak the MFU is of: the A100's dense bf16 datasheet figure


# Brown et al. 2020, table D.1: (total train compute in FLOPs, parameters) at 300B tokens for
# GPT-3, 250B for BERT-Base. The table's FLOPs are 6 * its rounded parameter count * D, the planner's
# 6 * (the weights a token multiplies through) * D: it leaves out the position table (and the
# paper's counts are rounded), which matters most for the smallest model (1%).
TABLE_D1 = {"gpt3-small": (2.25e20, 300e9), "gpt3-medium": (6.41e20, 300e9), "gpt3-large": (1.37e21, 300e9),
            "gpt3-xl": (2.38e21, 300e9), "gpt3-2.7b": (4.77e21, 300e9), "gpt3-6.7b": (1.20e22, 300e9),
            "gpt3-13b": (2.31e22, 300e9), "gpt3-175b": (3.14e23, 300e9), "bert-base": (1.64e20, 250e9)}


@pytest.mark.parametrize("name", list(TABLE_D1))
def test_six_nd_reproduces_brown_et_al_table_d1(name):
    flops, tokens = TABLE_D1[name]
    six_nd = training_flops(preset(name), tokens)["six_nd"]
    assert close(six_nd, flops, 0.002 if name == "gpt3-175b" else 0.012), (six_nd, flops)
    assert close(pf_days(six_nd), flops / 8.64e19, 0.012)  # the table's PF-days column is FLOPs / 8.64e19


def test_cost_json_plot_and_config_file(capsys, tmp_path):
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"model": dict(preset("gpt2", vocab_multiple=1).to_dict(), name="mine")}))
    png = tmp_path / "c.png"
    assert main(["cost", "gpt3-175b", str(cfg), "--tokens", "300e9", "--json", "--plot", str(png)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [p["model"] for p in d["plans"]] == ["gpt3-175b", "mine"]
    assert close(d["plans"][0]["pf_days"], 3637 + 101, 0.01)  # 6ND 3,637 + attention 8.7e21/8.64e19
    assert d["plans"][1]["params"]["total"] == 124_439_808
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_days_flags_an_impossible_claim(capsys):
    # GPT-3 175B in one day on 8 A100s would need an MFU far above 1
    assert main(["cost", "gpt3-175b", "--tokens", "300e9", "--gpus", "8", "--days", "1"]) == 0
    assert "impossible" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["cost", "gpt2", "--hardware", "b200"], "known: v100, a100"),
    (["cost", "gpt2", "--tokens", "0"], "--tokens"),
    (["cost", "gpt2", "--tokens", "-3e9"], "--tokens"),
    (["cost", "gpt2", "--mfu", "1.5"], "(0, 1]"),
    (["cost", "gpt2", "--mfu", "0"], "(0, 1]"),
    (["cost", "gpt2", "--hardware", "v100", "--precision", "bf16"], "bf16"),
    (["cost", "gpt-nine"], "unknown preset"),
    (["bench", "--peak", "--seconds", "0"], "--seconds"),
    (["bench", "--only", "no-such-bench"], "--only"),
    (["bench", "--rounds", "0"], "--rounds"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("content,needle", [
    ('{"n_layer": 2, "d_model": 100, "n_head": 3}', "not divisible"),
    ('[1, 2]', "mapping"),
    ('{"d_ff": "wide"}', "cannot count"),
    ('{"n_layr": 2}', "n_layer"),
])
def test_uncountable_config_file_is_one_line_exit_2(content, needle, tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text(content)
    assert main(["cost", str(f)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_bench_peak_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRETUNE_CACHE", str(tmp_path))
    assert main(["bench", "--peak", "--dtypes", "fp32", "--seconds", "0.2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["peaks"]["fp32"]["flops"] > 0
    assert (tmp_path / "peak.json").exists()


# ---- hardware as data: one table, three readers ---------------------------------------------------

@pytest.mark.parametrize("device_name,row", [
    ("NVIDIA H100 80GB HBM3", "h100"),  # the SXM5 part's name
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-PCIE-40GB", "a100"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA A10", "a10g"),
    ("Tesla V100-SXM2-16GB", "v100"),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_from_device_name_finds_the_row_of_a_real_device_name(device_name, row):
    from pretune.hardware.table import from_device_name

    hw = from_device_name(device_name)
    assert (hw.name if hw else None) == row


def test_the_table_is_data_with_the_datasheets_dense_peaks():
    # dense = the sparse headline / 2 (H100 datasheet: bf16 1,978.9 SXM, 1,671 NVL; L4: 242; L40S 733 -> 362.05)
    for name, dense in (("h100", 989.4e12), ("h200", 989.4e12), ("h100-nvl", 835.5e12), ("l4", 121e12),
                        ("l40s", 362.05e12), ("h100-pcie", 756e12), ("a100", 312e12)):
        assert HARDWARE[name].peak["bf16"] == pytest.approx(dense)
        # (the L40S datasheet itself prints 362.05 dense and 733 sparse: 1.2% apart)
        assert HARDWARE[name].sparse["bf16"] == pytest.approx(2 * dense, rel=0.013)


def test_the_planners_hardware_help_lists_every_row(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        main(["cost", "--help"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("--hardware HARDWARE"))
    listed = [w.strip(",") for w in line.split("--hardware HARDWARE", 1)[1].split("(default")[0].split()]
    assert [w for w in listed if w not in ("or", "(measured)")] == [*HARDWARE, "cpu"]


def test_a_row_added_to_the_table_is_found_by_all_three_readers(monkeypatch, cached_cpu_peak):
    """New hardware is one row: the planner, a running GPU's MFU peak and the GPU check all see it."""
    import importlib.util
    from pathlib import Path

    import torch

    from pretune.hardware.table import Hardware, from_device_name
    from pretune.planning import report

    row = Hardware("x9", "Acme X9", {"fp32": 100e12, "bf16": 800e12}, {"bf16": 1600e12}, 500, 96,
                   patterns=("acme x9",))
    monkeypatch.setitem(HARDWARE, "x9", row)
    # the planner: its --hardware choices and its lookup
    assert "x9" in report.hardware_help().split(", ")
    assert get_hardware("X9") is row
    p = plan(preset("gpt2"), 1e9, "x9", 8, 0.5)
    assert p["peak_flops_per_device"] == 800e12
    # the device lookup (the MFU hook's peak on a CUDA device), by the name torch reports
    assert from_device_name("Acme X9 96GB") is row
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Acme X9 96GB")
    assert device_peak("cuda", "bf16")[0] == 800e12
    # the GPU check
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "scripts" / "gpu_check.py")
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)
    assert g.dense_bf16_peak("Acme X9 96GB") == 800e12
