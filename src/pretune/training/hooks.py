"""Hooks: what the training loop calls at its events (the base class), and the hooks pretune ships."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.moe import moe_layers
from ..runs.plots import plot_moe


class Hook:
    """A plug-in point of the loop. Override what you need; every method may read
    `trainer.step`, `trainer.model`, `trainer.optimizer`, `trainer.tc`, `trainer.run_dir`."""

    def on_start(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer", loss: torch.Tensor, parts: dict) -> None:
        """`loss` is a device tensor: read it (`.item()`) only when you must."""
    def on_log(self, trainer: "Trainer", record: dict) -> None:
        """May add fields to `record` before it is written to metrics.jsonl."""
    def on_eval(self, trainer: "Trainer", metrics: dict) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None: ...
    def state_dict(self) -> dict:
        return {}
    def load_state_dict(self, d: dict) -> None: ...


class MoEStatsHook(Hook):
    """Logs the routers' statistics to metrics.jsonl, averaged over the steps since
    the last log line, and draws them to `moe.png` at each checkpoint:

        moe_entropy       mean router entropy in nats (log E = uniform; 0 = one expert)
        moe_dropped       fraction of the routing assignments dropped by capacity
        moe_imbalance     E * max_i f_i, the busiest expert's load over a fair share (1 = balanced)
        moe_expert_frac   per routed layer, the fraction f_i of assignments per expert

    The statistics of the last micro-batch of each step are summed on the device;
    the host reads them only at log time."""

    def __init__(self):
        self._sum: torch.Tensor | None = None  # (layers, E + 2): f_1..f_E, dropped, entropy
        self._n = 0

    def after_step(self, trainer, loss, parts) -> None:
        layers = [m for m in moe_layers(trainer.model) if m.stats]
        if not layers:
            return
        s = torch.stack([torch.cat([m.stats["expert_fraction"], m.stats["dropped"][None], m.stats["entropy"][None]])
                         for m in layers])
        self._sum = s if self._sum is None else self._sum + s
        self._n += 1

    def on_log(self, trainer, record: dict) -> None:
        if self._sum is None:
            return
        s = (self._sum / self._n).cpu()
        self._sum, self._n = None, 0
        f = s[:, :-2]
        record["moe_entropy"] = float(s[:, -1].mean())
        record["moe_dropped"] = float(s[:, -2].mean())
        record["moe_imbalance"] = float(f.shape[1] * f.max())
        record["moe_expert_frac"] = [[round(float(v), 5) for v in row] for row in f]

    def on_checkpoint(self, trainer, path) -> None:
        try:
            plot_moe(trainer.run_dir)
        except Exception as e:  # a plot must never lose a run
            print(f"note: could not draw moe.png: {e}")

    def state_dict(self) -> dict:
        return {"n": self._n, "sum": None if self._sum is None else self._sum.cpu().double().tolist()}

    def load_state_dict(self, d: dict) -> None:
        self._n = d.get("n", 0)
        self._sum = None if d.get("sum") is None else torch.tensor(d["sum"], dtype=torch.float32)
