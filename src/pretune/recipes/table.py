"""The demo's one table: every way of getting a classifier, by how many labels it needs.

Rows are ways (a bag-of-words baseline, the minis pre-trained here, MiniLM pre-trained by
others, SmolLM2 prompted); columns the labelled examples used (0, 100, 1,000; all under
--full). A cell is the mean test accuracy over its seeds, with the standard deviation when
there is more than one; a row that could not run says why in its cells ("pending: ...").
"""

from __future__ import annotations

import statistics
from pathlib import Path

# The rows in the order of the argument: the bar to clear, pre-training here, pre-training at scale.
ORDER = ["bag-of-words logistic regression", "gpt-mini pre-trained here", "gpt-mini from scratch",
         "gpt-mini pre-trained here, L3", "bert-mini pre-trained here", "bert-mini from scratch",
         "bert-mini pre-trained here, L3", "all-MiniLM-L6 pre-trained by others", "all-MiniLM-L6 from scratch",
         "SmolLM2-135M prompted, zero-shot", "SmolLM2-135M prompted, 4-shot"]

NAMES = {"pretrained": "{m} pre-trained here", "scratch": "{m} from scratch", "pretrained+L3": "{m} pre-trained here, L3"}


def transfer_rows(rows: list[dict]) -> list[dict]:
    """The transfer grid's rows ({model, variant, labels, seed, accuracy}) as table rows."""
    out = []
    for r in rows:
        m = "all-MiniLM-L6" if r["model"] == "all-MiniLM-L6-v2" else r["model"]
        name = NAMES[r["variant"]].format(m=m)
        if m == "all-MiniLM-L6" and r["variant"] == "pretrained":
            name = "all-MiniLM-L6 pre-trained by others"
        out.append({"row": name, "labels": r["labels"], "seed": r["seed"], "accuracy": r["accuracy"]})
    return out


def summarise(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """{(row, labels): {mean, std, seeds}} over the seeds of each cell."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["labels"]), []).append(r["accuracy"])
    return {k: {"mean": statistics.fmean(a), "std": statistics.stdev(a) if len(a) > 1 else 0.0, "seeds": len(a)}
            for k, a in groups.items()}


def _row_order(names) -> list[str]:
    return sorted(dict.fromkeys(names), key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def format_paradigm_table(rows: list[dict], majority: float, columns=(0, 100, 1000),
                          pending: dict[str, str] | None = None, notes: dict[str, str] | None = None) -> str:
    """Markdown: one line per row, one column per labelled-set size; `pending` {row: why} fills a
    row that did not run, `notes` {row: text} adds a remark after its name."""
    s = summarise(rows)
    seeds = {n: sorted({c["seeds"] for (r, m), c in s.items() if m == n}) for n in columns}
    head = " | ".join(f"{n:,} labels" + (f" ({seeds[n][0]} seed{'s' if seeds[n][0] > 1 else ''})"
                                          if len(seeds[n]) == 1 else "") for n in columns)
    lines = [f"| | {head} |", "|---|" + "---|" * len(columns)]
    for name in _row_order([r["row"] for r in rows] + list(pending or {})):
        cells = []
        for n in columns:
            c = s.get((name, n))
            if c is not None:
                cells.append(f"{c['mean']:.1%}" + (f" ± {c['std']:.1%}" if c["seeds"] > 1 else ""))
            elif (pending or {}).get(name) and n == 0 and "prompted" in name:
                cells.append(pending[name])
            else:
                cells.append("")
        label = name + (f" ({notes[name]})" if (notes or {}).get(name) else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| majority class | " + " | ".join(f"{majority:.1%}" for _ in columns) + " |")
    return "\n".join(lines)


def plot_paradigm(rows: list[dict], majority: float, path: Path, columns=(0, 100, 1000)) -> None:
    """The table as a chart: test accuracy against labelled examples, one line per row, ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs.plots import save_figure

    s = summarise(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = {n: i for i, n in enumerate(columns)}
    for i, name in enumerate(_row_order(r["row"] for r in rows)):
        pts = [(xs[n], 100 * s[(name, n)]["mean"], 100 * s[(name, n)]["std"]) for n in columns if (name, n) in s]
        if not pts:
            continue
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, fmt="o-" if len(pts) > 1 else "D", capsize=3, label=name, color=f"C{i % 10}")
    ax.axhline(100 * majority, color="gray", ls=":", label=f"majority class ({majority:.1%})")
    ax.set_xticks(range(len(columns)), [f"{n:,}" for n in columns])
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel("test accuracy, % (movie-sentiment)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)
    plt.close(fig)
