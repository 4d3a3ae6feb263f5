"""`pretune bench`: measurements of this machine. `--peak` times large matrix multiplies.

The peak is what MFU on a CPU (or on a GPU the hardware table does not know)
is measured against; it is cached (hardware/peak.py) so training runs reuse it. The
side-by-side suite is the sibling package `pretune_bench` (the `[bench]` extra).
"""

from __future__ import annotations

import json as _json
from pathlib import Path

from ..errors import PretuneError


def bench_cmd(peak: bool = False, device: str = "cpu", dtypes: list[str] | None = None,
              seconds: float = 3.0, json: bool = False, only: list[str] | None = None,
              quick: bool = False, rounds: int | None = None, threads: int | None = None,
              out: Path | None = None, docs: Path | None = None, from_json: Path | None = None) -> dict:
    """Benchmark this machine: pretune against Hugging Face side by side (the suite), or `--peak`.

    Args:
        peak: time large square matrix multiplies (2·n³ FLOPs each) per dtype and cache the best rate
        device: cpu or cuda[:i]
        dtypes: comma-separated dtypes to time (default fp32,bf16; also fp16, tf32 on a GPU)
        seconds: time budget for all dtypes together
        json: print JSON instead of a table
        only: suite benchmarks whose label contains one of these (e.g. gpt_train,generate mini)
        quick: every benchmark with fewer rounds (about 15 minutes on 2 quiet cores; the full suite 35-45)
        rounds: A/B rounds per benchmark (default: each benchmark's own)
        threads: torch threads for both sides (default: torch's)
        out: write the results, with the date and the machine, as JSON to this file
        docs: regenerate the results table in this markdown file (e.g. docs/performance.md)
        from_json: regenerate --docs' table from this earlier --out file, running nothing
    """
    if not peak:
        try:  # the suite is a sibling package; only this verb imports it, and only here
            from pretune_bench.suite import _suite
        except ImportError as e:
            raise PretuneError(f"the benchmark suite is not installed (no module {e.name})", "pretune bench",
                               "pip install 'pretune[bench]'") from e
        if out is not None:
            from ..fileio import check_creatable
            check_creatable(out, "the results file", folder=False)  # before minutes of benchmarks
        return _suite(json, only, quick, rounds, threads, out, docs, from_json)
    if not (seconds > 0):
        raise PretuneError(f"--seconds must be positive, got {seconds!r}", None, "e.g. --seconds 3")
    from ..hardware.table import from_device_name
    from ..hardware.peak import TORCH_DTYPES, cache_file, machine_key, measure_peaks

    dtypes = dtypes or ["fp32", "bf16"]
    for d in dtypes:
        if d not in TORCH_DTYPES:
            raise PretuneError(f"unknown dtype '{d}'", "--dtypes", f"use {', '.join(TORCH_DTYPES)}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise PretuneError(f"unknown device '{device}'", "--device", "use cpu or cuda")
    res = measure_peaks(tuple(dtypes), device, seconds, progress=not json)
    key = machine_key(device)
    published = None
    if device.startswith("cuda"):
        import torch
        published = from_device_name(torch.cuda.get_device_name(torch.device(device)))
    out = {"machine": key, "device": device, "cache": str(cache_file()),
           "peaks": {d: {**r, "published_dense": (published.peak.get(d) if published else None)}
                     for d, r in res.items()}}
    if json:
        print(_json.dumps(out, indent=2))
        return out
    print(f"matmul peak on {key}")
    for d, r in out["peaks"].items():
        line = f"  {d:<5} {r['flops'] / 1e12:9.4g} TFLOP/s   (n={r['n']}, best of {r['repeats']})"
        if r["published_dense"]:
            line += f"   {r['flops'] / r['published_dense']:.0%} of the datasheet's {r['published_dense'] / 1e12:.4g}"
        print(line)
    print(f"cached in {cache_file()}: MFU on this {'CPU' if device == 'cpu' else 'device'} is measured "
          f"against these figures")
    return out
