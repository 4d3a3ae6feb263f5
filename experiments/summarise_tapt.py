"""Print experiments/tapt.py's finished cells as a markdown table (test accuracy per seed, mean)."""
import json, statistics, sys
from pathlib import Path

root = Path("runs/exp-tapt")
for m in ("gpt-mini", "bert-mini"):
    rows = {}
    for f in sorted(root.glob(f"{m}/ft-*/{m}/*/n*-s*/results.json")):
        stage, variant, cell = f.parts[-5], f.parts[-3], f.parts[-2]
        n, s = cell[1:].split("-s")
        name = {"ft-A": "built-in corpus (the demo's)", "ft-B": "built-in + TAPT on the reviews"}.get(stage, stage)
        name = "scratch" if variant == "scratch" else name
        rows.setdefault((name, int(n)), []).append((int(s), json.loads(f.read_text())["test"]["accuracy"]))
    if not rows:
        continue
    print(f"\n{m}\n| init | labels | seeds 0 / 1 / 2 | mean |\n|---|---|---|---|")
    for (name, n), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [a for _, a in sorted(v)]
        print(f"| {name} | {n:,} | " + " / ".join(f"{100 * a:.1f}" for a in accs) + f" | {100 * statistics.fmean(accs):.1f} |")
