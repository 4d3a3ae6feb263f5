"""The loss-spike and non-finite guard: mid-flight corrections without a person watching.

Large runs do not always go down: the loss spikes, or a step turns the weights
to NaN. The published recipe is manual: PaLM (Chowdhery et al. 2022, sec. 5.1)
"restarted training from a checkpoint roughly 100 steps before the spike
started, and skipped roughly 200-500 data batches"; OPT-175B's logbook
(Zhang et al. 2022) restarts from the last checkpoint with a lower learning
rate. `LossGuard` does the same on its own:

  trouble   the step's loss is not finite, the gradient norm is not finite
            (except in fp16, where an overflow is the loss scaler's business: it
            skips the step and lowers the scale), or the loss exceeds `factor`
            times the median of the last `window` losses (times `floor`, if that is
            larger: fine-tuning sets it to ln K, a uniform guess over K classes, since
            near a loss of 0 three times the median is one misread batch);
  rollback  `Trainer.rollback()`: the newest good checkpoint before this step,
            with the data position kept where it is, so every batch read since
            that checkpoint (the window that led to the trouble) is skipped; a
            checkpoint is written at once, so a crash now resumes past the skip;
  cooldown  the lr is multiplied by `lr_scale` for `cooldown` steps, then ramps
            linearly back to 1 over another `cooldown` steps;
  give up   after `max_interventions` rollbacks, trouble once more stops the run
            with one line (exit 2); the last good checkpoint is left as it was.

Each intervention goes to the console and to metrics.jsonl as a row with
`"event": "rollback"` (its `step` is the step training continues from).

The guard reads the loss, the gradient norm and (fp16) the scaler's overflow flag
every step, in one read: the training loop's one host-device sync per step (a
dropless mixture-of-experts layer adds its own, models/moe.py). On a GPU the host then
cannot queue the next step while this one runs; on the CPU it costs nothing.
That is the price of catching a bad step before the next one runs. Reading the
losses only at log time would let up to `log_every - 1` more steps run on top of
a bad one, and the hooks' states and a fault that lasts some steps (the lr burst
of tests/test_guard.py) would move on with them, to be thrown away: the run
would not be the one this guard makes. `--train.guard false` removes the sync.
"""

from __future__ import annotations

import math
import statistics
import sys

import torch

from ..errors import PretuneError
from ..runs.checkpoint import list_checkpoints
from .hooks import Hook


class LossGuard(Hook):
    """Roll back on a loss spike or a non-finite loss / gradient norm (see the module doc)."""

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
    def from_config(cls, tc) -> "LossGuard":
        return cls(tc.guard_factor, tc.guard_window, tc.guard_lr_scale, tc.guard_cooldown, tc.guard_max)

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
