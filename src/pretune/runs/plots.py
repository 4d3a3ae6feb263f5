"""Plots people would rather see than read: the loss curves of a run."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..fileio import atomic_write_bytes


def save_figure(fig, path: str | Path) -> None:
    """Render to memory, then write atomically (never a half-written PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """loss.png: training loss per step and validation loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(out or Path(run_dir) / "loss.png")
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_moe(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """moe.png: router entropy, imbalance and dropped fraction per step; the last
    logged expert loads as a layers x experts heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    rows = [r for r in read_metrics(run_dir) if "moe_entropy" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [r["moe_entropy"] for r in rows], label="router entropy (nats)")
    a.plot(steps, [r["moe_imbalance"] for r in rows], label="imbalance E·max f_i (1 = even)")
    a.plot(steps, [r["moe_dropped"] for r in rows], label="dropped fraction")
    a.set_xlabel("step")
    a.grid(alpha=0.3)
    a.legend()
    frac = rows[-1]["moe_expert_frac"]
    im = b.imshow(frac, aspect="auto", cmap="viridis")
    b.set_xlabel("expert")
    b.set_ylabel("routed layer")
    b.set_title(f"share of assignments per expert, step {steps[-1]}")
    fig.colorbar(im, ax=b)
    fig.suptitle(Path(run_dir).name)
    path = Path(out or Path(run_dir) / "moe.png")
    save_figure(fig, path)
    plt.close(fig)
    return path
