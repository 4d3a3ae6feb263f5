"""Task-adaptive pre-training (Gururangan et al. 2020, "Don't Stop Pretraining", sec. 5): continue a
pre-trained run's own objective on the task's unlabelled training texts before fine-tuning.

The texts are the task's training split with the labels dropped (`data.labelled.write_unlabelled`:
no validation or test text is seen), tokenized with the run's own tokenizer; the continued run
starts from the run's weights with a fresh optimizer and warmup, the same recipe otherwise.
"""

from __future__ import annotations

from pathlib import Path

from ..data.labelled import write_unlabelled
from ..runs.checkpoint import load_weights, require_checkpoint
from ..runs.resolve import resolve_model_config
from ..training.config import TrainConfig
from ..training.hooks import Hook


class InitFrom(Hook):
    """Start a run from another run's weights (a fresh run only: a resumed one keeps its own)."""

    def __init__(self, run: Path):
        self.run = Path(run)

    def on_start(self, trainer):
        if trainer.step == 0:
            load_weights(trainer.model, require_checkpoint(self.run, "pre-train it first"))


def task_data(run: Path, task: str, out: Path) -> Path:
    """The task's unlabelled training texts as token shards in the run's tokenizer (made once)."""
    from ..data.prepare import prepare

    out = Path(out)
    if not (out / "meta.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        txt = out.parent / f"{out.name}.txt"
        write_unlabelled(task, txt)
        prepare([str(txt)], str(Path(run) / "tokenizer.json"), out, progress=False)
    return out


def continue_on_task(run: Path, task: str, steps: int, out: Path, train_kw: dict) -> dict:
    """Continue `run`'s pre-training for `steps` on `task`'s unlabelled training texts into `out`."""
    from ..training.pretrain import pretrain

    cfg = resolve_model_config(Path(run))
    data = task_data(run, task, Path(out).parent / f"data-{Path(task).stem}-{Path(run).name}")
    kw = {**train_kw, "steps": steps, "warmup": max(1, steps // 10), "eval_every": steps, "ckpt_every": steps}
    return pretrain(cfg, TrainConfig.for_model(cfg, None, **kw), data, Path(out), hooks=[InitFrom(run)])
