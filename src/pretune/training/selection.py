"""Which validation is the best: the step a run keeps, tests and serves, and what early stopping
counts as an improvement.

Pre-training and the fine-tuning of regression and multi-label heads keep the lowest validation
loss. A single-label classifier keeps the highest validation accuracy, the task's own metric, and
the loss breaks ties: late in training the loss on a large validation split can rise while the
accuracy still rises too (the model grows more confident and more often right), and keeping the
lowest loss then kept the earlier, worse classifier (docs/finetuning.md, "Defaults that work":
MiniLM with all labels, 3 seeds, tested 85.2% kept by loss against 86.2% at the checkpoint with the
best accuracy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Selection:
    """Metrics compared in order, the first that differs deciding; `higher` names the ones where
    more is better. A validation with a missing or non-finite metric is never the best."""
    keys: tuple[str, ...]
    higher: frozenset[str] = frozenset()

    def score(self, metrics: dict) -> tuple[float, ...] | None:
        """The validation's score, lower is better (None: not comparable)."""
        vals = [metrics.get(k) for k in self.keys]
        if any(v is None or not math.isfinite(v) for v in vals):
            return None
        return tuple(-v if k in self.higher else v for k, v in zip(self.keys, vals))

    def describe(self) -> str:
        """e.g. 'validation accuracy, then loss'."""
        names = [k.removeprefix("val_").replace("acc", "accuracy") for k in self.keys]
        return "validation " + ", then ".join(names)


BY_LOSS = Selection(("val_loss",))
BY_ACCURACY = Selection(("val_acc", "val_loss"), frozenset({"val_acc"}))
