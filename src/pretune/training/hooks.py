"""Hooks: what the training loop calls at its events (the base class), the hooks pretune ships, and
`default_hooks`, the one place that decides which of them a pre-training or fine-tuning run gets.

This module does not import the loop (training/loop.py imports `Hook` from here)."""

from __future__ import annotations

import difflib
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config.model import ModelConfig
from ..errors import PretuneError
from ..hardware.peak import device_peak
from ..models.counting import train_flops_per_token
from ..models.moe import moe_layers
from ..runs.checkpoint import list_checkpoints
from ..runs.plots import plot_moe
from .config import TrainConfig


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


class MFUHook(Hook):
    """Adds `model_flops_per_s` and `mfu` to every logged record. FLOP/s = tokens/s ×
    train_flops_per_token; the peak is the one `device_peak` names, printed once at the start."""

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


class KeepBest(Hook):
    """The weights at the best validation (the trainer's selection), kept in memory: for runs that keep no checkpoints
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
    """Stop when `patience` evaluations in a row have not become the best (the trainer's selection:
    training/selection.py). Its state is saved with each checkpoint, so a rerun of a stopped run
    stays stopped."""

    def __init__(self, patience: int | None):
        self.patience, self.bad, self.stopped = patience, 0, False

    def on_start(self, trainer):
        if self.stopped:
            trainer.stop_requested = True

    def on_eval(self, trainer, metrics):
        if trainer.improved:
            self.bad = 0
            return
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            self.stopped = trainer.stop_requested = True
            print(f"early stop at step {trainer.step}: the {trainer.select.describe()} has not improved "
                  f"for {self.bad} evaluations (best at step {trainer.best_step})", file=sys.stderr)

    def state_dict(self):
        return {"bad": self.bad, "stopped": self.stopped}

    def load_state_dict(self, d):
        self.bad, self.stopped = d.get("bad", 0), d.get("stopped", False)


# ---- the loss-spike and non-finite guard: mid-flight corrections without a person watching ----
#
# Large runs do not always go down: the loss spikes, or a step turns the weights
# to NaN. The published recipe is manual: PaLM (Chowdhery et al. 2022, sec. 5.1)
# "restarted training from a checkpoint roughly 100 steps before the spike
# started, and skipped roughly 200-500 data batches"; OPT-175B's logbook
# (Zhang et al. 2022) restarts from the last checkpoint with a lower learning
# rate. `LossGuard` does the same on its own:
#
#   trouble   the step's loss is not finite, the gradient norm is not finite
#             (except in fp16, where an overflow is the loss scaler's business: it
#             skips the step and lowers the scale), or the loss exceeds `factor`
#             times the median of the last `window` losses (times `floor`, if that is
#             larger: fine-tuning sets it to ln K, a uniform guess over K classes, since
#             near a loss of 0 three times the median is one misread batch);
#   rollback  `Trainer.rollback()`: the newest good checkpoint before this step,
#             with the data position kept where it is, so every batch read since
#             that checkpoint (the window that led to the trouble) is skipped; a
#             checkpoint is written at once, so a crash now resumes past the skip;
#   cooldown  the lr is multiplied by `lr_scale` for `cooldown` steps, then ramps
#             linearly back to 1 over another `cooldown` steps;
#   give up   after `max_interventions` rollbacks, trouble once more stops the run
#             with one line (exit 2); the last good checkpoint is left as it was.
#
# Each intervention goes to the console and to metrics.jsonl as a row with
# `"event": "rollback"` (its `step` is the step training continues from).
#
# The guard reads the loss, the gradient norm and (fp16) the scaler's overflow flag
# every step, in one read: the training loop's one host-device sync per step (a
# dropless mixture-of-experts layer adds its own, models/moe.py). On a GPU the host then
# cannot queue the next step while this one runs; on the CPU it costs nothing.
# That is the price of catching a bad step before the next one runs. Reading the
# losses only at log time would let up to `log_every - 1` more steps run on top of
# a bad one, and the hooks' states and a fault that lasts some steps (the lr burst
# of tests/test_guard.py) would move on with them, to be thrown away: the run
# would not be the one this guard makes. `--train.guard false` removes the sync.

class LossGuard(Hook):
    """Roll back on a loss spike or a non-finite loss / gradient norm (see the comment above)."""

    def __init__(self, factor: float = 3.0, window: int = 50, lr_scale: float = 0.1, cooldown: int = 50,
                 max_interventions: int = 5, min_history: int | None = None, verbose: bool = True,
                 floor: float = 0.0):
        self.factor, self.window, self.lr_scale, self.cooldown = factor, window, lr_scale, cooldown
        self.floor = floor  # a loss at or below factor * floor is never a spike
        self.max_interventions = max_interventions
        self.min_history = min_history if min_history is not None else min(window, 10)
        self.verbose = verbose
        self.history: list[float] = []  # the last `window` accepted losses
        self.interventions = 0
        self.since: int | None = None  # the step training went back to at the last rollback

    @classmethod
    def from_config(cls, tc, floor: float = 0.0) -> "LossGuard":
        return cls(tc.guard_factor, tc.guard_window, tc.guard_lr_scale, tc.guard_cooldown, tc.guard_max,
                   floor=floor)

    # ---- the lr after a rollback ---------------------------------------------
    def scale_at(self, step: int) -> float:
        """lr multiplier: lr_scale for `cooldown` steps after a rollback, then a linear ramp to 1."""
        if self.since is None:
            return 1.0
        k = step - self.since
        if k < self.cooldown:
            return self.lr_scale
        if k < 2 * self.cooldown:
            return self.lr_scale + (1 - self.lr_scale) * (k - self.cooldown) / self.cooldown
        return 1.0

    # ---- hook points ---------------------------------------------------------
    def on_start(self, trainer) -> None:
        if not list_checkpoints(trainer.run_dir):
            trainer.save()  # something to roll back to before the first periodic checkpoint

    def before_step(self, trainer) -> None:
        s = self.scale_at(trainer.step)
        if s == 1.0:
            self.since = None
        for g in trainer.optimizer.param_groups:
            g["guard_lr_scale"] = s

    def after_step(self, trainer, loss, parts) -> None:
        found_inf = getattr(trainer, "found_inf", None)  # fp16: GradScaler found inf/NaN and skipped the step
        read = [loss.detach().float().reshape(())]
        read += [parts["grad_norm"].detach().float().reshape(()).to(read[0].device)] if "grad_norm" in parts else []
        read += [found_inf.float().reshape(()).to(read[0].device)] if found_inf is not None else []
        values = torch.stack(read).tolist()  # the one host sync the guard costs
        value = values[0]
        gnorm = values[1] if "grad_norm" in parts else 0.0
        scaler_skipped = found_inf is not None and values[-1] > 0
        median = statistics.median(self.history) if self.history else math.nan
        if not math.isfinite(value):
            reason = f"non-finite loss ({value})"
        elif not math.isfinite(gnorm) and not scaler_skipped:
            reason = f"non-finite gradient norm ({gnorm})"
        elif len(self.history) >= self.min_history and value > self.factor * max(median, self.floor):
            reason = f"loss spike: {value:.4g} > {self.factor:g} x the median {median:.4g} of the last " \
                     f"{len(self.history)} steps" if median >= self.floor else \
                     f"loss spike: {value:.4g} > {self.factor:g} x the floor {self.floor:.4g} (the median of " \
                     f"the last {len(self.history)} steps is {median:.4g})"
        else:
            self.history = (self.history + [value])[-self.window:]
            return
        self.intervene(trainer, reason, value, median)

    def on_log(self, trainer, record: dict) -> None:
        if self.since is not None:
            record["guard_lr_scale"] = self.scale_at(trainer.step - 1)
        if self.interventions:
            record["guard_interventions"] = self.interventions

    # ---- the intervention ----------------------------------------------------
    def intervene(self, trainer, reason: str, value: float, median: float) -> None:
        at = trainer.step
        if self.interventions >= self.max_interventions:
            keep = [p.name for p in list_checkpoints(trainer.run_dir)]
            raise PretuneError(f"training stopped: {reason} at step {at}, after {self.interventions} rollbacks "
                               f"(--train.guard-max)", str(trainer.run_dir),
                               f"the checkpoints ({', '.join(keep[-2:]) or 'none'}) are kept; lower --train.lr, "
                               "raise --train.warmup or check the data, then rerun the command to resume")
        self.interventions += 1
        ck, data_then, data_now = trainer.rollback()
        self.since = trainer.step
        trainer.save()  # the skip and this guard's state, durable before the next step
        first, last = _counter(data_then), _counter(data_now)
        event = {"step": trainer.step, "event": "rollback", "at_step": at, "reason": reason,
                 "spike_loss": value if math.isfinite(value) else None,
                 "median": median if math.isfinite(median) else None,
                 "to_checkpoint": ck.name, "skipped_batches": [first, last],
                 "lr_scale": self.lr_scale, "cooldown": self.cooldown,
                 "intervention": self.interventions, "max_interventions": self.max_interventions}
        trainer.log(event)
        skipped = f"batches {first}..{last - 1}" if isinstance(first, int) and isinstance(last, int) \
            else "the batches read since"
        msg = (f"guard: {reason} at step {at}; rolled back to {ck.name}, skipping {skipped}; "
               f"lr x{self.lr_scale:g} for {self.cooldown} steps, then back to 1 over {self.cooldown} "
               f"({self.interventions}/{self.max_interventions})")
        if self.verbose:
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stderr)
            except ImportError:
                print(msg, file=sys.stderr)

    # ---- resume --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": self.history, "interventions": self.interventions, "since": self.since}

    def load_state_dict(self, d: dict) -> None:
        self.history = list(d.get("history", []))
        self.interventions = int(d.get("interventions", 0))
        self.since = d.get("since")


def _counter(data_state: dict | None):
    """The batch counter of a loader's state (data/loaders.py calls it `batch`)."""
    if not isinstance(data_state, dict):
        return None
    for key in ("batch", "k", "index"):
        if isinstance(data_state.get(key), int):
            return data_state[key]
    return None


# ---- which hooks a run gets --------------------------------------------------------------

@dataclass(frozen=True)
class HookContext:
    """What a hook's factory may read to decide whether, and how, it joins a run."""
    model_cfg: ModelConfig
    tc: TrainConfig
    purpose: str  # "pretrain" or "finetune" (a key of PURPOSES)
    seq_len: int | None = None  # the training sequence length (MFU's attention term)
    patience: int | None = None  # fine-tuning: evaluations without improvement before stopping
    keep_best: bool = False  # fine-tuning without checkpoints: hold the best weights in memory
    n_labels: int | None = None  # a classifier's classes K: the guard's floor is ln K
    predicted: float | None = None  # the share of positions the objective predicts (None: the model's own)


HookFactory = Callable[[HookContext], "Hook | None"]  # None: the hook does not apply to this run


def _guard(ctx: HookContext) -> "LossGuard | None":
    if not ctx.tc.guard:  # loss spikes and non-finite losses -> roll back, skip the data, lower the lr
        return None
    # A classifier's loss heads for 0, where 3x the median is one misread batch: a spike must also
    # be above factor x ln K (a uniform guess). L3's L1 term keeps its median above that anyway.
    return LossGuard.from_config(ctx.tc, floor=math.log(ctx.n_labels) if ctx.n_labels else 0.0)


HOOKS: dict[str, HookFactory] = {
    "mfu": lambda ctx: MFUHook(ctx.model_cfg, ctx.seq_len, ctx.tc.precision, ctx.predicted),  # the cost planner's live MFU
    "early_stopping": lambda ctx: EarlyStopping(ctx.patience),
    "keep_best": lambda ctx: KeepBest() if ctx.keep_best else None,
    # the routers' expert loads, drops and entropy -> metrics.jsonl, moe.png
    "moe_stats": lambda ctx: MoEStatsHook() if ctx.model_cfg.n_expert else None,
    "guard": _guard,
}

EXTRA = "<caller>"  # the place of the caller's own hooks in a purpose's list

# Each purpose's hooks, in the order the loop calls them (the order is part of the numerics: the
# guard reads the loss after the others' after_step, and it rolls back their states with its own).
PURPOSES: dict[str, list[str]] = {
    "pretrain": ["mfu", EXTRA, "moe_stats", "guard"],
    "finetune": ["early_stopping", "keep_best", "moe_stats", "guard", EXTRA],
}


def _near(name: str, names) -> str:
    near = difflib.get_close_matches(str(name), list(names), n=1)
    return (f"did you mean {near[0]}? " if near else "") + f"known: {', '.join(names)}"


def register(name: str, factory: HookFactory, purposes=("pretrain", "finetune"), before: str | None = None) -> None:
    """Add a hook to the runs of `purposes`: at the end (after the caller's own hooks), or just
    before the hook named `before`. `factory(ctx)` returns the hook, or None where it does not apply."""
    for p in purposes:
        order = PURPOSES.setdefault(p, [EXTRA])
        if name in order:
            order.remove(name)
        order.insert(order.index(before) if before in order else len(order), name)
    HOOKS[name] = factory


def get_hook(name: str) -> HookFactory:
    """The factory of the hook `name`; one error line naming the near names otherwise."""
    if name not in HOOKS:
        raise PretuneError(f"unknown hook '{name}'", None, _near(name, HOOKS))
    return HOOKS[name]


def default_hooks(model_cfg: ModelConfig, tc, purpose: str = "pretrain", *, extra=(), seq_len: int | None = None,
                  patience: int | None = None, keep_best: bool = False, n_labels: int | None = None,
                  predicted: float | None = None) -> list[Hook]:
    """The hooks of a `purpose` run ("pretrain" or "finetune"), in PURPOSES' order, with the caller's
    own `extra` hooks at their place: what training/pretrain.py and tasks/finetune.py both call."""
    if purpose not in PURPOSES:
        raise PretuneError(f"unknown training purpose '{purpose}'", None, _near(purpose, PURPOSES))
    ctx = HookContext(model_cfg, tc, purpose, seq_len, patience, keep_best, n_labels, predicted)
    out: list[Hook] = []
    for name in PURPOSES[purpose]:
        if name == EXTRA:
            out += list(extra)
        elif (hook := get_hook(name)(ctx)) is not None:
            out.append(hook)
    return out
