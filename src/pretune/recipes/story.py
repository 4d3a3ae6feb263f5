"""What pre-training costs: the published figures beside pretune's own arithmetic.

Each published claim is quoted as the lecture (issue 20) quotes it, then re-derived with the
planner's formulas (planning/cost.py: 6ND + attention, PF-days, implied MFU, dollars, kWh) and the
hardware table's datasheet peaks (hardware/table.py), so the reader sees which numbers agree and
which assumptions (a sparse peak, 100% utilisation) make them agree. Then the demo's own runs,
counted the same way. Torch-free: it reads configs and measured seconds only.
"""

from __future__ import annotations

from ..config.presets import preset
from ..hardware.table import HARDWARE
from ..models.counting import training_flops
from ..planning.cost import PF_DAY, SECONDS_PER_DAY, dollars, energy_kwh, implied_mfu, pf_days

# GPT-1 (Radford et al. 2018): "30 days on 8 GPUs", and the lecture's 26 PF-days. OpenAI's blog post
# (June 2018, "Improving language understanding with unsupervised learning", Compute) gives its own
# arithmetic: 8 GPUs x 30 days x 12 TFLOPS/GPU x 0.33 utilisation = 0.96 PF-days.
GPT1 = dict(gpus=8, days=30, pf_days=26.0, blog_pf_days=0.96, blog_tflops=12.0, blog_util=0.33,
            # the paper, sec. 4.1: 100 epochs of minibatches of 64 x 512 tokens; BooksCorpus is about
            # 800M words (Zhu et al. 2015: 984.8M), ~1B BPE tokens: about 2.4e10 tokens over the run
            epochs=100, corpus_tokens=0.8e9 * 1.3)
# GPT-3 175B (Brown et al. 2020, table D.1: 3.64E+03 PF-days; 300B tokens, sec. 2.2).
GPT3 = dict(paper_pf_days=3640.0, tokens=300e9, usd=360e3, usd_per_instance_day=240.0, pf_days_per_instance_day=2.0,
            kwh=190e3, usd_per_kwh=0.22, usd_energy=42e3, gpus_per_instance=8)
# GPT-4 (SemiAnalysis, July 2023; not published by OpenAI): ~25,000 A100 for 90-100 days, 32-36% MFU,
# $1 per A100-hour -> ~$63M; the rumoured 13T training tokens (preset gpt4-moe, docs/compute.md).
GPT4 = dict(gpus=25_000, days=(90, 100), mfu=(0.32, 0.36), usd_per_gpu_hour=1.0, usd=60e6, tokens=13e12)


def gpt1_figures() -> dict:
    """The per-GPU rate 26 PF-days in 30 days on 8 GPUs implies, against 2018's fastest GPU (V100)."""
    g = GPT1
    rate = g["pf_days"] * PF_DAY / (g["gpus"] * g["days"] * SECONDS_PER_DAY)  # FLOP/s per GPU
    v100 = HARDWARE["v100"]
    tokens = g["epochs"] * g["corpus_tokens"]
    planner = training_flops(preset("gpt1"), tokens, seq_len=512)["total"]
    return {"per_gpu_flops": rate, "v100_fp16_peak": v100.peak["fp16"], "v100_fp32_peak": v100.peak["fp32"],
            "v100_fp16_mfu": rate / v100.peak["fp16"], "v100_fp32_mfu": rate / v100.peak["fp32"],
            "blog_pf_days": g["gpus"] * g["days"] * g["blog_tflops"] * 1e12 * g["blog_util"] / 1e15,
            "tokens": tokens, "planner_pf_days": pf_days(planner),
            "planner_per_gpu_flops": planner / (g["gpus"] * g["days"] * SECONDS_PER_DAY)}


def gpt3_figures() -> dict:
    """GPT-3's PF-days by 6ND, and what the quoted dollars and kWh assume."""
    g = GPT3
    flops = training_flops(preset("gpt3-175b"), g["tokens"], seq_len=2048)
    a10g = HARDWARE["a10g"]  # G5 instances: 8 x A10G
    instance_pf = g["gpus_per_instance"] * a10g.peak["bf16"] / 1e15  # PF/s dense, per instance
    instance_pf_sparse = g["gpus_per_instance"] * a10g.sparse["bf16"] / 1e15
    implied_pf_days = g["usd"] / g["usd_per_instance_day"] * g["pf_days_per_instance_day"]
    instance_days = g["paper_pf_days"] / instance_pf  # at the dense peak, 100% utilisation
    return {"six_nd_pf_days": pf_days(flops["six_nd"]), "planner_pf_days": pf_days(flops["total"]),
            "paper_pf_days": g["paper_pf_days"], "quoted_usd_implies_pf_days": implied_pf_days,
            "instance_pf_dense": instance_pf, "instance_pf_sparse": instance_pf_sparse,
            "usd_at_paper_pf_days_sparse_full_mfu": g["paper_pf_days"] / instance_pf_sparse * g["usd_per_instance_day"],
            "usd_at_paper_pf_days_dense_full_mfu": instance_days * g["usd_per_instance_day"],
            "usd_at_paper_pf_days_dense_35_mfu": instance_days / 0.35 * g["usd_per_instance_day"],
            "energy_usd": g["kwh"] * g["usd_per_kwh"],
            "kwh_per_instance_hour": g["kwh"] / (g["usd"] / g["usd_per_instance_day"] * 24),
            "planner_kwh_dense_35_mfu": energy_kwh(instance_days / 0.35 * 24 * g["gpus_per_instance"],
                                                   a10g.power_w)}


def gpt4_figures() -> dict:
    """25,000 A100 x 90-100 days: dollars, and the FLOPs 32-36% MFU gives, against 6ND at 13T tokens."""
    g = GPT4
    a100 = HARDWARE["a100"].peak["bf16"]
    lo = g["gpus"] * a100 * g["mfu"][0] * g["days"][0] * SECONDS_PER_DAY
    hi = g["gpus"] * a100 * g["mfu"][1] * g["days"][1] * SECONDS_PER_DAY
    planner = training_flops(preset("gpt4-moe"), g["tokens"])["total"]
    return {"usd": [dollars(g["gpus"] * d * 24, g["usd_per_gpu_hour"]) for d in g["days"]],
            "flops": [lo, hi], "pf_days": [pf_days(lo), pf_days(hi)], "planner_flops": planner,
            "planner_mfu": [implied_mfu(planner, g["gpus"], d, a100) for d in g["days"]]}


def demo_figures(runs: list[dict], cpu_watts: float = 15.0) -> dict:
    """FLOPs, PF-days and energy of the demo's runs: each {"model": preset or ModelConfig, "tokens",
    "seq_len", "seconds"}. Energy at `cpu_watts` per busy core pair (an estimate: a desktop core
    draws 5-10 W under load; the CPU has no power meter torch can read), PUE 1 (a desk)."""
    rows, total, secs = [], 0.0, 0.0
    for r in runs:
        cfg = preset(r["model"]) if isinstance(r["model"], str) else r["model"]
        f = training_flops(cfg, r["tokens"], seq_len=r["seq_len"])["total"]
        rows.append({**r, "model": cfg.name, "flops": f, "pf_days": pf_days(f),
                     "flops_per_s": f / r["seconds"] if r.get("seconds") else None})
        total += f
        secs += r.get("seconds") or 0.0
    kwh = energy_kwh(secs / 3600, cpu_watts, pue=1.0)
    return {"runs": rows, "flops": total, "pf_days": pf_days(total), "seconds": secs, "kwh": kwh,
            "gpt3_ratio": GPT3["paper_pf_days"] / pf_days(total) if total else None}


def _e(x: float) -> str:
    return f"{x:.2e}"


def cost_lines(demo: dict | None = None) -> list[str]:
    """The story in a few lines: each quoted figure, then pretune's check of it."""
    g1, g3, g4 = gpt1_figures(), gpt3_figures(), gpt4_figures()
    out = [
        "== what pre-training costs: the published figures, and pretune's arithmetic",
        f"GPT-1: '30 days on 8 GPUs, 26 PF-days' implies {g1['per_gpu_flops'] / 1e12:.0f} TFLOP/s per GPU, "
        f"{g1['v100_fp16_mfu']:.0%} of a V100's fp16 tensor peak (125) and {g1['v100_fp32_mfu']:.0f}x its fp32 "
        f"(15.7): no 2018 GPU sustains that. OpenAI's own arithmetic is 8 x 30 days x 12 TFLOP/s x 0.33 = "
        f"{g1['blog_pf_days']:.2f} PF-days; 6ND over 100 epochs of ~1B tokens ({g1['tokens']:.1e}) gives "
        f"{g1['planner_pf_days']:.1f} PF-days, {g1['planner_per_gpu_flops'] / 1e12:.1f} TFLOP/s per GPU.",
        f"GPT-3 175B: {g3['paper_pf_days']:,.0f} PF-days (Brown et al., table D.1); pretune's 6ND at 300B tokens "
        f"{g3['six_nd_pf_days']:,.0f}, with attention {g3['planner_pf_days']:,.0f}. '$360K on G5 at $240 per "
        f"2 PF-days' prices {g3['quoted_usd_implies_pf_days']:,.0f} PF-days at the A10G's sparse peak "
        f"({g3['instance_pf_sparse']:.0f} PF/s per 8-GPU instance) and 100% utilisation; at the paper's PF-days, "
        f"the dense peak ({g3['instance_pf_dense']:.0f} PF/s) and 35% MFU it is "
        f"${g3['usd_at_paper_pf_days_dense_35_mfu'] / 1e6:.1f}M. '190K kWh, $42K at $0.22': "
        f"190,000 x 0.22 = ${g3['energy_usd'] / 1e3:.1f}K; over the 1,500 instance-days the $360K buys, "
        f"{g3['kwh_per_instance_hour']:.1f} kW per instance (its 8 A10G draw 1.2 kW); pretune's energy at the "
        f"paper's PF-days, dense peak, 35% MFU, 150 W a GPU, PUE 1.1: {g3['planner_kwh_dense_35_mfu'] / 1e3:,.0f}K kWh.",
        f"GPT-4 (estimate): 25,000 A100 x 90-100 days x $1/h = ${g4['usd'][0] / 1e6:.0f}M-"
        f"${g4['usd'][1] / 1e6:.0f}M; at 32-36% MFU that is {_e(g4['flops'][0])}-{_e(g4['flops'][1])} FLOPs "
        f"({g4['pf_days'][0]:,.0f}-{g4['pf_days'][1]:,.0f} PF-days); the gpt4-moe preset's 6ND at 13T tokens "
        f"{_e(g4['planner_flops'])} (MFU {g4['planner_mfu'][1]:.0%}-{g4['planner_mfu'][0]:.0%}).",
    ]
    if demo:
        out.append(f"this demo's pre-training (6ND + attention): {_e(demo['flops'])} FLOPs = {demo['pf_days']:.1e} "
                   f"PF-days in {demo['seconds'] / 60:.1f} min on this CPU, ~{demo['kwh'] * 1000:.0f} Wh at ~15 W "
                   f"(an estimate: no power meter); GPT-3 took {demo['gpt3_ratio']:.1e} times more compute.")
    return out
