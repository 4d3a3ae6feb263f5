"""`pretune cost`: the plans side by side as a table, and the compute per model as a chart."""

from __future__ import annotations

import json as _json
import math
from pathlib import Path

from ..errors import PretuneError
from ..hardware.peak import get_hardware
from ..hardware.table import HARDWARE
from .cost import _check_mfu, _check_positive, load_model, pf_days, plan


# --------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------

def _si(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.{digits}g} {prefix}{unit}".rstrip()
    return f"{x:.{digits}g} {unit}".rstrip()


def _count(x: float) -> str:
    for factor, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= factor:
            return f"{x / factor:.4g}{s}"
    return f"{x:.0f}"


def _usd(x: float | None) -> str:
    if x is None:
        return "-"
    for factor, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= factor:
            return f"${x / factor:.3g}{s}"
    return f"${x:,.0f}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_table(plans: list[dict]) -> str:
    """Rows are quantities, columns the models, side by side."""
    rows = [
        ("parameters (total)", lambda p: _count(p["params"]["total"])),
        ("  active per token", lambda p: _count(p["params"]["active"])),
        ("  non-embedding (Kaplan N)", lambda p: _count(p["params"]["non_embedding"])),
        ("  N in 6ND (active + output)", lambda p: _count(p["params"]["flop_params"])),
        ("tokens D", lambda p: _count(p["tokens"])),
        ("FLOPs 6ND", lambda p: f"{p['flops']['six_nd']:.3g}"),
        ("  + attention 12LTd·D", lambda p: f"{p['flops']['attention']:.3g} (T={p['flops']['seq_len']})"),
        ("  = training FLOPs", lambda p: f"{p['flops']['total']:.3g}"),
        ("PF-days", lambda p: _num(p["pf_days"])),
        ("MFU" , lambda p: f"{p['mfu']:.1%}" + ("" if p["mfu_given"] else " (implied)")
                           + (" !" if p["mfu_flag"] else "")),
        ("device-days", lambda p: _num(p["device_days"])),
        ("wall-clock days", lambda p: _num(p["wall_clock_days"])),
        ("cost", lambda p: _usd(p["usd"])),
        ("energy (kWh at the wall)", lambda p: "-" if p["energy_kwh"] is None else _si(p["energy_kwh"] * 1e3, "Wh")),
        ("  energy cost", lambda p: _usd(p["energy_usd"])),
        ("train states (weights+grads+Adam)", lambda p: _si(p["memory_bytes"]["train_states"], "B")
                                                        + f" ({p['memory_bytes']['bytes_per_param']} B/param)"),
        ("  per device, fully sharded", lambda p: _si(p["train_states_per_device_sharded"], "B")),
        ("activations per token", lambda p: _si(p["memory_bytes"]["activations_per_token"], "B")
                                            + " / flash " + _si(p["memory_bytes"]["activations_per_token_flash"], "B")),
        ("KV cache per token", lambda p: _si(p["memory_bytes"]["kv_cache_per_token"], "B")),
        ("memory per device DDP / FSDP", lambda p: _si(p["fits"]["ddp"], "B") + " / " + _si(p["fits"]["fsdp"], "B")
                                                  + (f" -> {p['fits']['needs']}" if p["fits"]["needs"] else "")),
        ("inference FLOPs/token", lambda p: f"{p['inference_flops_per_token']['total']:.3g}"
                                            f" (2N {p['inference_flops_per_token']['weights']:.3g})"),
    ]
    header = [""] + [p["model"] for p in plans]
    body = [[name] + [fn(p) for p in plans] for name, fn in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    return "\n".join(lines)


def plot_compute(plans: list[dict], path: str | Path) -> Path:
    """A log-scale bar chart of training compute per model in PF-days (like GPT-3's fig. 2.2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs.plots import save_figure

    names = [p["model"] for p in plans]
    six = [pf_days(p["flops"]["six_nd"]) for p in plans]
    tot = [p["pf_days"] for p in plans]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(plans) + 2), 4.5))
    ax.bar(names, tot, color="#9ecae1", label="+ attention (12·L·T·d per token)")
    ax.bar(names, six, color="#3182bd", label="6·N·D")
    for i, v in enumerate(tot):
        ax.annotate(_num(v), (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("training compute (petaflop/s-days, log scale)")
    ax.set_title(f"{_count(plans[0]['tokens'])} tokens each" if len({p['tokens'] for p in plans}) == 1
                 else "training compute")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    path = Path(path)
    save_figure(fig, path)
    plt.close(fig)
    return path


def cost_cmd(models: list[str], tokens: float = 300e9, hardware: str = "a100", gpus: int = 1024,
             mfu: float = 0.4, days: float | None = None, precision: str | None = None,
             seq_len: int | None = None, price: float | None = None, instance_price: float | None = None,
             per_instance: int = 8, power: float | None = None, pue: float = 1.1,
             kwh_price: float | None = None, context: int | None = None, micro_batch: int = 1,
             activation_checkpointing: bool = False, json: bool = False,
             plot: Path | None = None) -> list[dict]:
    """What training a model costs: parameters, FLOPs, PF-days, device-days, wall-clock, $, kWh, memory.

    Args:
        models: presets (gpt1 gpt2-xl gpt3-175b gpt4-moe ...) or model/run config files
        tokens: training tokens D (e.g. 300e9)
        hardware: {hardware}
        gpus: number of devices (GPUs or TPU chips)
        mfu: model FLOPs utilisation, in (0, 1]: the fraction of the dense peak the run sustains
        days: instead of --mfu: the run's length; reports the MFU it implies and flags implausible ones
        precision: the peak to use (bf16, fp16, fp32, tf32, fp8); default: the hardware's usual one
        seq_len: training sequence length T of the attention term (default: the model's window)
        price: US dollars per device-hour
        instance_price: US dollars per instance-hour (instead of --price), with --per-instance devices each
        per_instance: devices per instance (8 for an 8-GPU node)
        power: watts per device (default: the hardware table's)
        pue: the data centre's power usage effectiveness (energy at the wall / energy of the IT load)
        kwh_price: US dollars per kWh, for the energy bill
        context: context length for the inference FLOPs per token (default: the model's window)
        micro_batch: sequences per device per micro-batch, for the activations in the memory verdict
        activation_checkpointing: count activations as with --train.activation-checkpointing
        json: print JSON instead of a table
        plot: write a log-scale bar chart of compute per model to this PNG file
    """
    if not models:
        raise PretuneError("no model given", "pretune cost", "name presets or config files, e.g. gpt2 gpt3-175b")
    _check_positive("tokens", tokens)
    _check_positive("gpus", gpus)
    if days is None:
        _check_mfu(mfu)
    for name, v in (("price", price), ("instance-price", instance_price), ("kwh-price", kwh_price),
                    ("power", power)):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise PretuneError(f"--{name} must be >= 0, got {v!r}", None, "give a non-negative number")
    if not (math.isfinite(pue) and pue >= 1.0):
        raise PretuneError(f"--pue must be >= 1, got {pue!r}", None, "e.g. 1.1 for a modern data centre")
    _check_positive("per_instance", per_instance)
    hw = get_hardware(hardware)
    cfgs = [load_model(m) for m in models]
    plans = [plan(c, tokens, hw, gpus, mfu, days, precision, seq_len, price, instance_price, per_instance,
                  pue, kwh_price, power, context, micro_batch, activation_checkpointing) for c in cfgs]
    if plot:
        plot_compute(plans, plot)
    if json:
        print(_json.dumps({"hardware": {"name": hw.name, "label": hw.label, "peak": hw.peak, "sparse": hw.sparse,
                                        "power_w": hw.power_w, "note": hw.note, "source": hw.source},
                           "plans": plans}, indent=2))
        return plans
    dtype = plans[0]["precision"]
    kind = "matmul peak (measured)" if hw.name == "cpu" else "dense peak (datasheet)"
    print(f"hardware: {gpus:,} x {hw.label}, {dtype} {kind} {hw.peak_for(dtype) / 1e12:,.4g} TFLOP/s each"
          + (f"; {hw.note}" if hw.note else ""))
    if days is None:
        print(f"assumed MFU {mfu:.0%} of that peak; PUE {pue}")
    else:
        print(f"run length fixed at {days:g} days: the MFU row is what that implies; PUE {pue}")
    print()
    print(format_table(plans))
    print()
    print("6ND: Kaplan et al. 2020 sec. 2.1 (N = active non-embedding + output projection); attention term "
          "12·L·T·d_attn per token: Chowdhery et al. 2022 app. B; 1 PF-day = 8.64e19 FLOPs.")
    if price is None and instance_price is None:
        print("add --price USD_PER_DEVICE_HOUR (or --instance-price) for dollars, --kwh-price for the energy bill")
    for p in plans:
        if p["mfu_flag"]:
            print(f"! {p['model']}: {p['mfu_flag']}")
    if plot:
        print(f"chart: {plot}")
    return plans


def hardware_help() -> str:
    """The `--hardware` choices, read from the hardware table (a new row is listed with no edit here)."""
    return ", ".join(HARDWARE) + ", or cpu (measured)"


cost_cmd.__doc__ = cost_cmd.__doc__.replace("{hardware}", hardware_help())
