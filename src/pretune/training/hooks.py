"""Hooks: what the training loop calls at its events (the base class), and the hooks pretune ships."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..hardware.peak import device_peak
from ..models.counting import train_flops_per_token
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


class MFUHook:
    """Adds `model_flops_per_s` and `mfu` to every logged record (a `Hook`, duck-typed so
    this module stays free of torch at import). FLOP/s = tokens/s × train_flops_per_token; the peak
    is the one `device_peak` names, printed once at the start."""

    def __init__(self, model_cfg: ModelConfig, seq_len: int | None, precision: str = "fp32",
                 predicted: float | None = None):
        if predicted is None:  # the share the model's objective predicts (masked-LM: 15%, BERT)
            from ..objectives.registry import pretraining_objective
            predicted = pretraining_objective(model_cfg).predicted
        self.flops_per_token = train_flops_per_token(model_cfg, seq_len, predicted)
        self.precision = precision
        self.peak: float | None = None
        self.peak_label = ""

    def on_start(self, trainer) -> None:
        try:
            self.peak, self.peak_label = device_peak(getattr(trainer, "device", "cpu"), self.precision)
        except PretuneError as e:  # no peak: log FLOP/s without an MFU
            self.peak, self.peak_label = None, str(e)
        if getattr(trainer, "progress", False):
            print(f"MFU against: {self.peak_label}")

    def on_log(self, trainer, record: dict) -> None:
        if "tok_per_s" not in record:
            return
        fps = record["tok_per_s"] * self.flops_per_token
        record["model_flops_per_s"] = fps
        if self.peak:
            record["mfu"] = fps / self.peak
            record["peak_flops"] = self.peak

    def before_step(self, trainer) -> None: ...
    def after_step(self, trainer, loss, parts) -> None: ...
    def on_eval(self, trainer, metrics) -> None: ...
    def on_checkpoint(self, trainer, path) -> None: ...
    def state_dict(self) -> dict:
        return {}
    def load_state_dict(self, d: dict) -> None: ...


class KeepBest(Hook):
    """The weights at the best validation loss, kept in memory: for runs that keep no checkpoints
    (the transfer experiment), where writing one per evaluation would cost more than the run."""

    def __init__(self):
        self.state: dict | None = None
        self.step: int | None = None  # the step `state` is from

    def on_eval(self, trainer, metrics):
        if trainer.best_step == trainer.step:
            self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            self.step = trainer.step

    def on_checkpoint(self, trainer, path):
        if self.step is not None and self.step > trainer.step:  # the guard rolled back past it: undone
            self.state = self.step = None


class EarlyStopping(Hook):
    """Stop when the validation loss has not improved for `patience` evaluations in a row.
    Its state is saved with each checkpoint, so a rerun of a stopped run stays stopped."""

    def __init__(self, patience: int | None):
        self.patience, self.best, self.bad, self.stopped = patience, float("inf"), 0, False

    def on_start(self, trainer):
        if self.stopped:
            trainer.stop_requested = True

    def on_eval(self, trainer, metrics):
        v = metrics.get("val_loss")
        if v is None:
            return
        if v < self.best:
            self.best, self.bad = v, 0
        else:
            self.bad += 1
            if self.patience and self.bad >= self.patience:
                self.stopped = trainer.stop_requested = True
                print(f"early stop at step {trainer.step}: validation loss has not improved for {self.bad} "
                      f"evaluations (best {self.best:.4f} at step {trainer.best_step})", file=sys.stderr)

    def state_dict(self):
        return {"best": self.best if math.isfinite(self.best) else None, "bad": self.bad, "stopped": self.stopped}

    def load_state_dict(self, d):
        self.best = d.get("best") if d.get("best") is not None else float("inf")
        self.bad, self.stopped = d.get("bad", 0), d.get("stopped", False)
