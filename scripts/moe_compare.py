"""Does the MoE train? A small MoE GPT and BERT against dense models of equal
active and of equal total parameters, at the same steps, tokens, data and seed.

For each preset three runs, one after another (issue 7 item 5):

    moe            E experts, top-k, each of width d_expert_ff        (ff per token: k * d_expert_ff)
    dense-active   a dense MLP of d_ff = k * d_expert_ff               (the same active parameters,
                                                                        less the router's d*E per layer)
    dense-total    a dense MLP of d_ff = E * d_expert_ff               (the same total parameters, idem)

Each run is `pretune pretrain`, so rerunning the script resumes an interrupted
run and skips a finished one (the trainer's own resume). At the end it prints
the validation losses as a Markdown table (the task loss, `val_loss`, beside the
task loss plus the MoE's auxiliary terms, `val_moe_aux`) and draws the
validation curves to `<out>/moe_compare.png`.

    nice .venv/bin/python scripts/moe_compare.py --steps 150 --batch-size 8 --seq-len 128
    .venv/bin/python scripts/moe_compare.py --report-only      # table and plot from the runs on disk
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from pretune.config.presets import preset
from pretune.fileio import atomic_write_text
from pretune.models.counting import count_params
from pretune.runs.plots import read_metrics, save_figure

TASK = {True: ("l1",), False: ("mlm", "nsp")}  # the task-loss parts logged as val_<part>


def grid(models, n_expert, top_k, d_expert_ff):
    """(model, variant, arch overrides) for every run."""
    for m in models:
        yield m, "moe", {"n_expert": n_expert, "top_k": top_k, "d_expert_ff": d_expert_ff}
        yield m, "dense-active", {"d_ff": top_k * d_expert_ff}
        yield m, "dense-total", {"d_ff": n_expert * d_expert_ff}


def arch_flags(arch: dict) -> list[str]:
    return [x for k, v in arch.items() for x in (f"--model.{k.replace('_', '-')}", str(v))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gpt-mini", "bert-mini"])
    ap.add_argument("--n-expert", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-expert-ff", type=int, default=512)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    ap.add_argument("--out", default="runs/moe")
    ap.add_argument("--report-only", action="store_true", help="no training: table and plot from the runs on disk")
    a = ap.parse_args(argv)

    out = Path(a.out)
    train = ["--train.steps", a.steps, "--train.batch-size", a.batch_size, "--train.seq-len", a.seq_len,
             "--train.warmup", a.warmup, "--train.eval-every", a.eval_every, "--train.eval-batches",
             a.eval_batches, "--train.log-every", 10, "--train.seed", a.seed, "--train.device", "cpu"]
    runs = list(grid(a.models, a.n_expert, a.top_k, a.d_expert_ff))
    commands = []
    for m, variant, arch in runs:
        cmd = ["pretune", "pretrain", "--model", m, *arch_flags(arch), *map(str, train),
               "--out", str(out / f"{m}-{variant}")]
        commands.append(" ".join(cmd))
        if a.report_only:
            continue
        print(f"\n== {m} {variant}: {' '.join(cmd)}", flush=True)
        env = None
        if a.threads:
            import os
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        t0 = time.time()
        rc = subprocess.call([sys.executable, "-m", "pretune", *cmd[1:]], env=env)
        print(f"== exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            return rc

    table = report(out, runs, a)
    print("\n" + "\n".join(commands) + "\n\n" + table)
    atomic_write_text(out / "moe_compare.md", "```\n" + "\n".join(commands) + "\n```\n\n" + table)
    png = plot(out, runs)
    if png:
        print(f"plot: {png}")
    return 0


def report(out: Path, runs, a) -> str:
    rows = ["| model | variant | params total | active | tokens | val task loss | with aux "
            "| median train tok/s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, variant, arch in runs:
        c = preset(m, **arch)
        n = count_params(c)
        recs = read_metrics(out / f"{m}-{variant}")
        val = [r for r in recs if "val_loss" in r]
        if not val:
            rows.append(f"| {m} | {variant} | {n['total']:,} | {n['active']:,} | | (not run) | | |")
            continue
        last = val[-1]
        task = sum(last.get(f"val_{p}", 0.0) for p in TASK[c.causal])
        logged = [r for r in recs if "tokens" in r]
        tokens = logged[-1]["tokens"] if logged else last["step"] * a.batch_size * a.seq_len
        speed = sorted(r["tok_per_s"] for r in logged)[len(logged) // 2] if logged else float("nan")
        rows.append(f"| {m} | {variant} | {n['total']:,} | {n['active']:,} | {tokens:,} (step {last['step']}) "
                    f"| {task:.4f} | {task + last.get('val_moe_aux', 0.0):.4f} | {speed:,.0f} |")
    return "\n".join(rows) + "\n"


def plot(out: Path, runs) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(m for m, _, _ in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    drawn = False
    for ax, m in zip(axes[0], models):
        causal = preset(m).causal
        for mm, variant, _ in runs:
            if mm != m:
                continue
            recs = read_metrics(out / f"{m}-{variant}")
            val = [r for r in recs if "val_loss" in r]
            if val:
                drawn = True
                ax.plot([r["step"] for r in val], [sum(r.get(f"val_{p}", 0.0) for p in TASK[causal]) for r in val],
                        marker="o", label=variant)
        ax.set_title(f"{m}: validation {' + '.join(TASK[causal])}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    if not drawn:
        plt.close(fig)
        return None
    path = out / "moe_compare.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
