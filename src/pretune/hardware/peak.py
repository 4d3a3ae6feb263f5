"""This machine's peak, measured: the matrix-multiply rate torch reaches per dtype.

A CPU has no datasheet peak that software reaches (it depends on the vector
units, the cores torch may use, the BLAS), so the MFU of a CPU run is measured
against what a large square matmul achieves here: 2·n³ FLOPs per
`torch.mm(n×n, n×n)`, the best of several timed repeats, the matrix grown until
one multiply takes long enough to time. The result is cached in
`$PRETUNE_CACHE/peak.json` (default `~/.cache/pretune/peak.json`), keyed by
the processor, the torch version and the thread count, so a changed machine
is measured afresh.

Also here: `get_hardware` (a table entry by name; "cpu" is this machine, measured) and
`device_peak` / `mfu`, the peak an MFU figure of a running device is measured against.
"""

from __future__ import annotations

import difflib
import json
import platform
import time
from pathlib import Path

from ..errors import PretuneError
from ..fileio import atomic_write_json, cache_root
from .table import ALIASES, HARDWARE, Hardware, from_device_name, known


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "tf32": "float32"}


def cache_file() -> Path:
    return cache_root() / "peak.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def machine_key(device: str = "cpu") -> str:
    """What a cached peak is valid for: processor, torch version, threads (or the GPU's name)."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} | torch {torch.__version__}"
    return f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _read_cache() -> dict:
    try:
        d = json.loads(cache_file().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_peaks(device: str = "cpu") -> dict[str, dict]:
    """{dtype: {"flops": FLOP/s, "n": matrix size, "measured_at": ...}} cached for this machine."""
    entry = _read_cache().get(machine_key(device), {})
    return entry.get("dtypes", {}) if isinstance(entry, dict) else {}


def _time_mm(a, b, sync) -> float:
    import torch

    sync()
    t = time.perf_counter()
    torch.mm(a, b)
    sync()
    return time.perf_counter() - t


def measure_matmul(dtype: str = "fp32", device: str = "cpu", seconds: float = 1.5,
                   max_n: int | None = None) -> dict:
    """Best FLOP/s of n×n @ n×n in `dtype` on `device`, within about `seconds`."""
    import torch

    if dtype not in TORCH_DTYPES:
        raise PretuneError(f"cannot measure dtype '{dtype}'", None, f"use one of {', '.join(TORCH_DTYPES)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PretuneError("no CUDA device to measure", None, "use --device cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tdt = getattr(torch, TORCH_DTYPES[dtype])
    max_n = max_n or (16384 if dev.type == "cuda" else 4096)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    if dev.type == "cuda":  # fp32 is the plain rate, tf32 the tensor-core one
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        gen = torch.Generator(device=dev).manual_seed(0)
        n, deadline = 256, time.perf_counter() + seconds
        best = 0.0
        while True:  # grow n until one multiply takes ~1/20 of the budget (or max_n)
            a = torch.randn(n, n, generator=gen, device=dev).to(tdt)
            b = torch.randn(n, n, generator=gen, device=dev).to(tdt)
            _time_mm(a, b, sync)  # warm-up: allocation, kernel choice
            t = _time_mm(a, b, sync)
            if t >= seconds / 20 or n >= max_n or time.perf_counter() > deadline:
                break
            n *= 2
        reps = 0
        while reps < 3 or time.perf_counter() < deadline:
            t = _time_mm(a, b, sync)
            best = max(best, 2 * n ** 3 / t)
            reps += 1
            if reps >= 200:
                break
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return {"flops": best, "n": n, "repeats": reps, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def measure_peaks(dtypes=("fp32", "bf16"), device: str = "cpu", seconds: float = 3.0,
                  progress: bool = True, save: bool = True) -> dict[str, dict]:
    """Measure each dtype (about `seconds` in all) and cache the result for this machine."""
    from tqdm import tqdm

    out = {}
    per = seconds / max(1, len(dtypes))
    for dt in tqdm(list(dtypes), desc=f"peak matmul on {device}", unit="dtype", disable=not progress):
        out[dt] = measure_matmul(dt, device, per)
    if save:
        data = _read_cache()
        key = machine_key(device)
        entry = data.get(key) if isinstance(data.get(key), dict) else {}
        entry = {**entry, "device": device, "dtypes": {**entry.get("dtypes", {}), **out}}
        data[key] = entry
        atomic_write_json(cache_file(), data)
    return out


def measured_peak(dtype: str, device: str = "cpu", measure: bool = True, seconds: float = 1.0) -> float | None:
    """The cached peak for `dtype` here; measured now (and cached) if missing and `measure`."""
    have = cached_peaks(device)
    if dtype in have:
        return float(have[dtype]["flops"])
    if not measure:
        return None
    return float(measure_peaks((dtype,), device, seconds, progress=False)[dtype]["flops"])


def cpu_hardware(measure: bool = True, dtypes=("fp32", "bf16")) -> Hardware:
    """This machine's CPU as a Hardware entry, its peaks measured (cached after the first time)."""
    peaks = {}
    for dt in dtypes:
        v = measured_peak(dt, "cpu", measure=measure)
        if v:
            peaks[dt] = v
    if not peaks:
        raise PretuneError("this CPU's peak has not been measured", None, "run `pretune bench --peak` first")
    return Hardware("cpu", f"this CPU ({machine_key('cpu')})", peaks, {}, None, None,
                    default_dtype="fp32", note="peak measured by `pretune bench --peak`",
                    source=str(cache_file()))


def get_hardware(name: str, measure: bool = True) -> Hardware:
    """The table entry for `name`; "cpu" is this machine as measured (and cached) by peak.py."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key == "cpu":
        return cpu_hardware(measure=measure)
    if key not in HARDWARE:
        near = difflib.get_close_matches(key, known(), n=1)
        raise PretuneError(f"unknown hardware '{name}'", None,
                           (f"did you mean {near[0]}? " if near else "") + f"known: {', '.join(known())}")
    return HARDWARE[key]


# --------------------------------------------------------------------------
# MFU during training
# --------------------------------------------------------------------------

def _precision_dtype(device_type: str, precision: str) -> str:
    if precision == "fp32" and device_type == "cuda":
        import torch
        if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
            return "tf32"
    return precision


def device_peak(device, precision: str = "fp32", measure: bool = True) -> tuple[float, str]:
    """(peak FLOP/s, which peak it is) for a torch device (or a hardware-table name) and precision.

    A CUDA device uses its datasheet's dense peak (TF32 if fp32 matmuls are allowed to use it); a
    CPU, or a GPU not in the table, uses the matmul rate measured by `pretune bench --peak`."""

    dtype = precision
    name = str(device)
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        hw = get_hardware(name, measure=measure)
        return hw.peak_for(dtype), f"{hw.label} {dtype} dense peak {hw.peak_for(dtype) / 1e12:.4g} TFLOP/s"
    dev_type = name.split(":")[0]
    dtype = _precision_dtype(dev_type, precision)
    if dev_type == "cuda":
        import torch
        gpu = torch.cuda.get_device_name(torch.device(name))
        hw = from_device_name(gpu)
        if hw is not None and dtype in hw.peak:
            return hw.peak[dtype], f"{hw.label} {dtype} dense peak {hw.peak[dtype] / 1e12:.4g} TFLOP/s (datasheet)"
    v = measured_peak(dtype, name, measure=measure)
    if v is None:
        raise PretuneError(f"no measured {dtype} peak for {name}", None, "run `pretune bench --peak`")
    return v, f"{name} {dtype} matmul peak {v / 1e12:.4g} TFLOP/s (measured by `pretune bench --peak`)"


def mfu(model_flops_per_s: float, device="cpu", dtype: str = "fp32") -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak for `dtype`."""
    return model_flops_per_s / device_peak(device, dtype)[0]
