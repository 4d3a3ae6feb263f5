"""The one training loop, for every objective (L1, MLM + NSP, L2, L3).

The loop owns the order of things: lr from the schedule, forward under
autocast, backward (scaled for fp16), clip, step, log, evaluate, checkpoint.
Everything else plugs in through hooks (`Hook`): MFU logging, the loss-spike
guard, MoE statistics, fine-tuning metrics. What a hook may rely on is
written in docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from .config.model import ModelConfig
from .errors import PretuneError
from .fileio import atomic_write_json, atomic_write_text, check_creatable, make_dir
from .runs import checkpoint as ckpt
from .training.hooks import Hook


NO_DECAY_KINDS = ("bias", "norm", "embedding")


# What a rerun of a run with checkpoints may change (docs/training.md, "Resuming: what a rerun may
# change"). Free: no effect on the weights of any step (`steps` stretches or shortens the schedule
# from the resume step on). Deliberate: the schedule and the guard, changed only when named in
# --train.allow-change (lowering the lr after the guard gave up is the usual reason). Every other
# option that decides the trajectory (the model, seed, batch size, grad_accum, seq_len, the data,
# precision, the objective, the AdamW hyper-parameters, which the checkpoint's optimizer state
# would silently override) is refused.
RESUME_FREE = frozenset({"steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last", "device",
                         "compile", "allow_change"})


RESUME_DELIBERATE = frozenset({"lr", "min_lr_ratio", "warmup", "decay", "grad_clip", "guard", "guard_factor",
                               "guard_window", "guard_lr_scale", "guard_cooldown", "guard_max"})


def allowed_changes(spec) -> list[str]:
    """The option names of a --train.allow-change value ("lr,warmup")."""
    return [k.strip().replace("-", "_") for k in str(spec or "").split(",") if k.strip()]


@dataclass
class TrainConfig:
    """How to train: the optimiser, the schedule, precision, logging and checkpoints.
    The defaults here are GPT-3's recipe; `for_model` gives a model its own family's (recipes.py)."""

    steps: int = 1000  # optimizer steps in all
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int | None = None  # tokens per sequence; None = the model's window
    lr: float = 6e-4  # peak learning rate (this and the optimiser's fields: the model's recipe, recipes.py)
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup: int = 100  # linear warmup steps (recipe: the paper's count, at most a tenth of the steps)
    decay: str = "cosine"  # cosine | linear (BERT) | constant
    weight_decay: float = 0.1  # AdamW's decoupled decay, on every parameter no_decay does not name
    no_decay: str = "bias,norm"  # kinds AdamW does not decay: bias, norm (gains), embedding; "" = none
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with dynamic loss scaling)
    eval_every: int = 100  # steps between validation-loss estimates; 0 = only at the end
    eval_batches: int = 10  # batches per validation estimate
    log_every: int = 10  # steps between metrics.jsonl lines (the loss is read only then)
    ckpt_every: int = 200  # steps between checkpoints; a final one is always written
    keep_last: int = 3  # checkpoints kept (plus the best by validation loss)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model (opt-in)
    guard: bool = True  # roll back on a loss spike or a non-finite loss/gradient (guard.py)
    guard_factor: float = 3.0  # a loss above this many times the recent median is a spike
    guard_window: int = 50  # steps in the recent median
    guard_lr_scale: float = 0.1  # after a rollback the lr is multiplied by this ...
    guard_cooldown: int = 50  # ... for this many steps, then ramps back to 1 over as many
    guard_max: int = 5  # rollbacks allowed; trouble once more stops the run
    allow_change: str = ""  # on resume: comma-separated schedule options a rerun may change on purpose (lr, warmup...)

    def __post_init__(self):
        def bad(msg, fix):
            raise PretuneError(f"bad training option: {msg}", None, fix)
        for f in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, f) <= 0:
                bad(f"{f}={getattr(self, f)} must be positive", f"set --train.{f.replace('_', '-')} to 1 or more")
        if self.seq_len is not None and self.seq_len <= 1:
            bad(f"seq_len={self.seq_len} must be at least 2", "use the model's window or a smaller positive value")
        if not self.lr > 0 or not math.isfinite(self.lr):
            bad(f"lr={self.lr} must be a positive number", "use e.g. 3e-4")
        if self.precision not in ("fp32", "bf16", "fp16"):
            bad(f"precision={self.precision!r} is unknown", "use fp32, bf16 or fp16")
        if self.decay not in ("cosine", "linear", "constant"):
            bad(f"decay={self.decay!r} is unknown", "use cosine, linear or constant")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            bad("warmup must be >= 0 and min_lr_ratio in [0, 1]", "fix the schedule options")
        kinds = [k for k in str(self.no_decay).split(",") if k.strip()]
        wrong = [k for k in kinds if k.strip() not in NO_DECAY_KINDS]
        if wrong:
            bad(f"no_decay={self.no_decay!r}: '{wrong[0]}' is not a kind of parameter",
                f"list some of {', '.join(NO_DECAY_KINDS)}, comma-separated (or '' to decay all)")
        if not self.guard_factor > 1 or self.guard_window < 3 or not 0 < self.guard_lr_scale <= 1 \
                or self.guard_cooldown < 0 or self.guard_max < 0:
            bad("guard_factor must be > 1, guard_window >= 3, guard_lr_scale in (0, 1], "
                "guard_cooldown and guard_max >= 0", "fix the --train.guard-* options")
        for k in self.allowed_changes():
            if k not in RESUME_DELIBERATE:
                bad(f"allow_change names '{k}', which a resume {'may change anyway' if k in RESUME_FREE else 'never changes'}",
                    f"--train.allow-change takes {', '.join(sorted(RESUME_DELIBERATE))} (docs/training.md)")

    def allowed_changes(self) -> list[str]:
        return allowed_changes(self.allow_change)

    @classmethod
    def from_overrides(cls, d: dict | None, **defaults) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        for k in d or {}:
            if k not in known:
                raise PretuneError(f"unknown training option '{k}'", None, f"known: {', '.join(sorted(known))}")
        return cls(**{**defaults, **(d or {})})

    @classmethod
    def for_model(cls, model_cfg, d: dict | None = None, stage: str = "pretrain", **defaults) -> "TrainConfig":
        """The model's recipe for `stage` (pretrain | finetune; recipes.py), under the caller's
        `defaults` (a demo's tuned budget, finetune's steps), under the user's options `d`
        (--train.*): `--train.beta2 0.95` wins over any recipe."""
        from .config.training_recipes import recipe_for, train_defaults, warmup_steps

        cls.from_overrides(d, **defaults)  # an unknown or bad option fails here, before the recipe is read
        recipe = recipe_for(model_cfg, stage)
        base = train_defaults(recipe)
        given = {**defaults, **(d or {})}
        if stage == "pretrain" and "warmup" not in given:
            dflt = {f.name: f.default for f in fields(cls)}
            get = lambda k: given.get(k, base.get(k, dflt[k]))
            tokens_per_step = get("batch_size") * get("grad_accum") * (get("seq_len") or model_cfg.max_seq_len)
            base["warmup"] = warmup_steps(recipe, get("steps"), tokens_per_step)
        return cls.from_overrides(d, **{**base, **defaults})


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine or linear decay to lr * min_lr_ratio.
    A pure function of the step, so a resumed run needs no scheduler state."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    if tc.decay == "constant":
        return tc.lr
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    floor = tc.lr * tc.min_lr_ratio
    if tc.decay == "linear":
        return tc.lr - (tc.lr - floor) * progress
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))


_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm)


def param_kind(mod: torch.nn.Module, name: str, p: torch.Tensor) -> str:
    """bias | norm | embedding | weight. A bias by name (the stacked expert biases of moe.py are
    (E, F)), a norm's gain by its module or by being 1-D, an embedding table by its module."""
    if name.endswith("bias"):
        return "bias"
    if isinstance(mod, _NORMS) or p.dim() < 2:
        return "norm"
    return "embedding" if isinstance(mod, torch.nn.Embedding) else "weight"


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: str = "bias,norm") -> list[dict]:
    """[decayed, not decayed]: every trainable parameter whose kind `no_decay` does not name is
    decayed. The recipes' "bias,norm" is GPT-1's "all non bias or gain weights" (Radford et al. 2018,
    sec. 4.1) and BERT's `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`: the
    embeddings decay (recipes.py). A tied W_e is one parameter, classed by the embedding table."""
    skip = {k.strip() for k in no_decay.split(",") if k.strip()}
    decay, keep, seen = [], [], set()
    for _, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (keep if param_kind(mod, name, p) in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the decoupled weight decay of Loshchilov & Hutter (what GPT-1's "modified L2" and
    BERT's AdamWeightDecayOptimizer do), tc's betas and eps, decay on param_groups' first group."""
    kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    try:  # fused AdamW: one kernel for all parameters (CPU and CUDA in torch >= 2.4)
        return torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.no_decay), fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.no_decay), foreach=True, **kw)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PretuneError("device 'cuda' asked for, but no CUDA device is available", None, "use --train.device cpu")
    return torch.device(name)


class Trainer:
    """Runs `loss_fn(model, batch) -> (loss, parts)` over `batches` for tc.steps optimizer steps."""

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, batches, loss_fn: Callable,
                 run_dir: str | Path, eval_fn: Callable[[], dict] | None = None,
                 hooks: list[Hook] | None = None, run_config: dict | None = None,
                 progress: bool = True, tokens_per_batch: int | None = None):
        self.tc, self.run_dir = tc, Path(run_dir)
        self.device = resolve_device(tc.device)
        self.model = model.to(self.device)
        self.batches, self.loss_fn, self.eval_fn = batches, loss_fn, eval_fn
        self.hooks = list(hooks or [])
        self.run_config = run_config or {}
        self.progress = progress
        self.tokens_per_batch = tokens_per_batch
        self.optimizer = make_optimizer(self.model, tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.step = 0
        self.tokens = 0
        self.best_val = float("inf")
        self.best_step: int | None = None
        self.skipped_steps = 0  # fp16 steps GradScaler skipped; counted on the device (see the property)
        self.found_inf: torch.Tensor | None = None  # fp16: this step's overflow flag, 1.0 or 0.0 on the device
        self.stop_requested = False
        self.stop_signal: int | None = None  # SIGTERM / SIGINT received: stop after this step
        self.rolled_back = False  # set by rollback(): the rest of this step's bookkeeping is skipped
        self.last_eval: dict = {}
        self._forward = torch.compile(self.model) if tc.compile else self.model

    # ---- pieces ----------------------------------------------------------
    def autocast(self):
        if self.tc.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.tc.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        return {k: (v.pin_memory().to(self.device, non_blocking=True) if nb else v.to(self.device))
                if torch.is_tensor(v) else v for k, v in batch.items()}

    @property
    def skipped_steps(self) -> int:
        """fp16 steps GradScaler skipped (inf/NaN gradients). They are summed on the device,
        so reading this waits for the device: the loop reads it at log time and when saving."""
        if self._skipped_dev is not None:
            self._skipped_host += int(self._skipped_dev.item())
            self._skipped_dev = None
        return self._skipped_host

    @skipped_steps.setter
    def skipped_steps(self, n: int) -> None:
        self._skipped_host, self._skipped_dev = int(n), None

    def _found_inf(self, gnorm: torch.Tensor) -> torch.Tensor:
        """1.0 (on the device) if this step's scaled gradients held an inf or a NaN, else 0.0: the
        flag with which GradScaler skips the update and halves the scale, read without a sync."""
        state = self.scaler._per_optimizer_states.get(id(self.optimizer)) or {}
        flags = list(state.get("found_inf_per_device", {}).values())
        if not flags:  # a GradScaler that keeps its flags elsewhere: inf/NaN gradients have a non-finite norm
            return (~torch.isfinite(gnorm)).float()
        return sum(f.to(self.device, non_blocking=True) for f in flags).clamp(max=1.0)

    def _metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl with one write() of the complete line (O_APPEND). A
        crash can leave at most a cut-short last line, which the next run drops (`_truncate_metrics`)."""
        data = memoryview((json.dumps(record) + "\n").encode())
        try:
            with open(self._metrics_path(), "ab", buffering=0) as f:
                while data:  # a regular file takes it in one write; a short write continues
                    data = data[f.write(data):]
        except OSError as e:
            raise PretuneError(f"cannot write metrics.jsonl: {e.strerror}", str(self.run_dir),
                               "free disk space or fix permissions, then rerun the same command to resume") from e

    # ---- resume ------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the latest good checkpoint, if any. True if resumed."""
        ckpt.clean_partial(self.run_dir)
        ck = ckpt.latest_checkpoint(self.run_dir)
        if ck is None:
            if ckpt.list_checkpoints(self.run_dir):  # written, then damaged: never silently start over
                raise ckpt.no_checkpoint_error(self.run_dir, "")
            self._truncate_metrics()  # died before its first checkpoint: step 0 again, its lines go
            return False
        state = self._restore(ck)
        for h, hs in zip(self.hooks, state.get("hooks", [])):
            h.load_state_dict(hs)
        for name in ckpt.set_aside(self.run_dir, self.step):  # the broken ones latest_checkpoint passed over
            print(f"note: set the unusable checkpoint {name} aside as .broken-{name}")
        self._truncate_metrics()
        return True

    def _restore(self, ck: Path) -> dict:
        """Weights, optimizer, RNG, loss scaler, counters and data position from a checkpoint."""
        ckpt.load_weights(self.model, ck)
        state = ckpt.load_training_state(ck, self.optimizer)
        self.step = state["step"]
        self.tokens = state.get("tokens", 0)
        self.best_val = state.get("best_val", float("inf"))
        self.best_step = state.get("best_step")
        self.skipped_steps = state.get("skipped_steps", 0)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if state.get("data") is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["data"])
        return state

    def _truncate_metrics(self) -> None:
        """Metrics logged after the current step belong to a future that did not happen."""
        mp = self._metrics_path()
        if mp.exists():
            keep = []
            for line in mp.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.step:
                        keep.append(line)
                except ValueError:
                    pass  # a line cut short by a crash
            atomic_write_text(mp, "".join(line + "\n" for line in keep))

    def _logged_eval(self) -> dict | None:
        """The evaluation row metrics.jsonl holds for this step, if any (only the final one can be)."""
        mp = self._metrics_path()
        if not mp.exists():
            return None
        for line in mp.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("step") == self.step and "loss" not in r and any(k.startswith("val") for k in r):
                return {k: v for k, v in r.items() if k != "step"}
        return None

    def rollback(self) -> tuple[Path, dict | None, dict | None]:
        """Go back to the newest good checkpoint before this step, keeping the data position:
        the batches read since that checkpoint (the ones that led here) are skipped, as PaLM
        (Chowdhery et al. 2022, sec. 5.1) restarts ~100 steps before a spike and skips the
        200-500 batches around it. Hook states are kept (the guard counts its rollbacks).
        Returns (checkpoint, data state there, data state now)."""
        ck = ckpt.latest_checkpoint(self.run_dir, before=self.step)
        if ck is None:
            raise PretuneError(f"no good checkpoint before step {self.step} to roll back to", str(self.run_dir),
                               "save checkpoints more often (--train.ckpt-every)")
        data_now = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        self.optimizer.zero_grad(set_to_none=True)
        state = self._restore(ck)
        if data_now is not None:
            self.batches.load_state_dict(data_now)
        self._truncate_metrics()
        self.rolled_back = True
        return ck, state.get("data"), data_now

    def save(self) -> Path:
        state = {
            "tokens": self.tokens, "best_val": self.best_val, "best_step": self.best_step,
            "skipped_steps": self.skipped_steps,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "data": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None,
            "hooks": [h.state_dict() for h in self.hooks],
        }
        keep = {self.best_step} if self.best_step is not None else set()
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                    keep_last=self.tc.keep_last, keep=keep)
        for h in self.hooks:
            h.on_checkpoint(self, path)
        return path

    # ---- evaluation --------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with self.autocast():
            metrics = self.eval_fn()
        self.model.train()
        val = metrics.get("val_loss")
        if val is not None and val < self.best_val:
            self.best_val, self.best_step = val, self.step
        for h in self.hooks:
            h.on_eval(self, metrics)
        self.last_eval = metrics
        return metrics

    # ---- the loop ----------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, dict]:
        """One optimizer step over grad_accum micro-batches. Returns the mean loss (a device tensor)."""
        tc = self.tc
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, tc) * g.get("lr_scale", 1.0) * g.get("guard_lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        parts_sum: dict[str, torch.Tensor] = {}
        for _ in range(tc.grad_accum):
            batch = self._to_device(next(self.batches))
            with self.autocast():
                loss, parts = self.loss_fn(self._forward, batch)
            ckpt.fault_point("after_forward")
            self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.detach() / tc.grad_accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v.detach() / tc.grad_accum
            if self.tokens_per_batch:
                self.tokens += self.tokens_per_batch
            else:
                self.tokens += batch["input_ids"].numel()
        self.scaler.unscale_(self.optimizer)
        if tc.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        else:
            gnorm = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in self.model.parameters()
                                   if p.grad is not None))
        parts_sum["grad_norm"] = gnorm.detach()
        found_inf = self._found_inf(gnorm.detach()) if self.scaler.is_enabled() else None
        ckpt.fault_point("in_optimizer_step")
        self.scaler.step(self.optimizer)  # with found_inf the (fused) optimizer skips the update
        self.scaler.update()  # ... and the scale is halved; no host sync in either
        if found_inf is not None:  # inf/nan gradients: counted on the device, read at log time
            self._skipped_dev = found_inf if self._skipped_dev is None else self._skipped_dev + found_inf
        self.found_inf = found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return total, parts_sum

    def fit(self) -> dict:
        from tqdm import tqdm

        tc = self.tc
        torch.manual_seed(tc.seed)
        make_dir(self.run_dir, "the run directory")
        resumed = self.resume()
        if resumed:
            print(f"resuming {self.run_dir} from step {self.step}")
        self.model.train()
        for h in self.hooks:
            h.on_start(self)
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc=self.run_dir.name)
        old_handlers = self._catch_signals()
        try:
            final = self._loop(bar)
        finally:
            self._restore_signals(old_handlers)
        if self.stop_signal is not None and self.step < tc.steps:
            import signal
            name = signal.Signals(self.stop_signal).name
            print(f"pretune: stopped by {name} at step {self.step}/{tc.steps}; checkpoint "
                  f"{self.run_dir / 'checkpoints' / f'step-{self.step:06d}'} written; "
                  "resume with the same command", file=sys.stderr, flush=True)
            raise Preempted(128 + self.stop_signal)
        return final

    def _catch_signals(self) -> dict:
        """SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C): finish the step,
        checkpoint, stop. A second signal stops at once, with the same exit status (the
        checkpoints already written stay good). After the last step a signal changes nothing:
        the final evaluation and checkpoint are written and the run ends as finished."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                print(f"\npretune: {name} again: stopped at once at step {self.step}/{self.tc.steps}, no "
                      "checkpoint written for it; the checkpoints already written are intact; resume with "
                      "the same command", file=sys.stderr, flush=True)
                raise Preempted(128 + signum)
            self.stop_signal, self.stop_requested = signum, True
            if self.step >= self.tc.steps:
                print(f"\npretune: {name}: all {self.tc.steps} steps are done; writing the final checkpoint "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
                return
            print(f"\npretune: {name}: finishing step {self.step + 1}, then writing a "
                  "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, handler)
        return old

    @staticmethod
    def _restore_signals(old: dict) -> None:
        import signal
        for s, h in old.items():
            signal.signal(s, h)

    def _loop(self, bar) -> dict:
        tc = self.tc
        t0, tok0, last = time.perf_counter(), self.tokens, None
        while self.step < tc.steps and not self.stop_requested:
            for h in self.hooks:
                h.before_step(self)
            loss, parts = self.train_step()
            self.step += 1
            for h in self.hooks:
                h.after_step(self, loss, parts)
            if self.rolled_back:  # a hook (the guard) went back to a checkpoint: this step never happened
                self.rolled_back = False
                bar.n = self.step
                bar.refresh()
                t0, tok0 = time.perf_counter(), self.tokens
                continue
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                dt = time.perf_counter() - t0
                record = {"step": self.step, "loss": loss.item(), "lr": lr_at(self.step - 1, tc),
                          "tokens": self.tokens, "tok_per_s": (self.tokens - tok0) / max(dt, 1e-9)}
                record.update({k: float(v) for k, v in parts.items()})
                if self.skipped_steps:
                    record["skipped_steps"] = self.skipped_steps
                if self.scaler.is_enabled():
                    record["loss_scale"] = self.scaler.get_scale()
                for h in self.hooks:
                    h.on_log(self, record)
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}",
                                **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                t0, tok0 = time.perf_counter(), self.tokens
                last = record
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                m = self.evaluate()
                if m:
                    self.log({"step": self.step, **m})
            if self.step % tc.ckpt_every == 0 and self.step < tc.steps:
                self.save()
        bar.close()
        final = {}
        if self.step >= tc.steps:
            m = self._logged_eval()  # killed after the final evaluation was logged: not again
            if m is None:
                m = self.evaluate()
                if m:
                    self.log({"step": self.step, **m})
            final = {**(last or {}), **m}
        self.save()
        try:
            from .runs.plots import plot_metrics
            plot_metrics(self.run_dir)
        except Exception as e:  # a plot must never lose a run
            print(f"note: could not draw the loss plot: {e}")
        return final


class Preempted(SystemExit):
    """Raised by `Trainer.fit` once a SIGTERM/SIGINT stop has written its checkpoint. Its exit
    status is 128 + the signal (143 for SIGTERM, 130 for SIGINT), as a shell reports a process
    a signal ended: a scheduler (Kubernetes, SLURM --requeue) then sees a run that did not
    finish, and restarts it with the same command, which resumes."""


# --------------------------------------------------------------------------
# Pre-training: the `pretune pretrain` verb
# --------------------------------------------------------------------------

def data_fingerprint(data_dir: str | Path) -> str | None:
    """The identity of a prepared data folder: SHA-256 of its meta.json (its timing left out), so the
    same data resumes wherever the folder lies, and a folder prepared again from the same corpus
    with the same tokenizer is the same; None without a readable meta.json."""
    import hashlib
    try:
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    meta.pop("seconds", None)
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def trajectory(run_config: dict, extra: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """Every option of a run config (config.json) that a resume compares, flat, under the name its
    message uses: the model's fields (but its name and tokenizer name, which change nothing the
    data does not), the training options (seq_len resolved to the window), the objective, the
    data's fingerprint, and what `extra(run_config)` adds (fine-tuning: the task, the encoded
    training examples, the head, freezing)."""
    model = run_config.get("model") if isinstance(run_config.get("model"), dict) else {}
    out = dict(extra(run_config)) if extra is not None else {}  # first: the caller's own names come first
    out.update({k: v for k, v in model.items() if k not in ("name", "tokenizer")})
    train = run_config.get("train")
    if isinstance(train, dict):
        out.update({k: (v or model.get("max_seq_len")) if k == "seq_len" else v for k, v in train.items()})
    for k in ("objective", "data_sha256"):
        if run_config.get(k) is not None:
            out[k] = run_config[k]
    return out


def _shown(k: str, v: Any, run_config: dict) -> str:
    if k == "data_sha256":
        return f"the data {run_config.get('data')} (meta.json sha256 {str(v)[:12]})"
    if k == "examples_sha256":
        return f"training examples with sha256 {str(v)[:12]}"
    return f"{k}={v!r}"


def check_resume(run_dir: str | Path, run_config: dict, extra: Callable[[dict], dict] | None = None) -> list[str]:
    """Refuse to resume `run_dir` with options that would put it on another trajectory.

    Compared with the run's config.json when the run has checkpoints: every option of `trajectory`
    the two configs share (an option a newer pretune added is not held against an older run).
    A refused change raises a PretuneError naming it (nothing is written). Returns the changes let
    through (free ones and those named in --train.allow-change), as "k: old -> new" strings."""
    run_dir = Path(run_dir)
    p = run_dir / "config.json"
    if not p.exists() or not ckpt.list_checkpoints(run_dir):
        return []
    old_cfg = ckpt.read_run_config(run_dir)
    old, new = trajectory(old_cfg, extra), trajectory(run_config, extra)
    allowed = set(allowed_changes((run_config.get("train") or {}).get("allow_change")))
    changed = [k for k in old if k in new and old[k] != new[k]]
    refused = [k for k in changed if k not in RESUME_FREE and not (k in RESUME_DELIBERATE and k in allowed)]
    refused.sort(key=lambda k: k in ("data_sha256", "examples_sha256"))  # a named option first, if any changed
    if refused:
        k = refused[0]
        a, b = _shown(k, old[k], old_cfg), _shown(k, new[k], run_config)
        what = (f"the run was started on {a}, now on {b}" if k in ("data_sha256", "examples_sha256")
                else f"the run was started with {a}, now {b}")
        if len(refused) > 1:
            what += f" (and {len(refused) - 1} more: {', '.join(refused[1:])})"
        fix = "use the original options, or a new --out folder"
        if all(x in RESUME_DELIBERATE for x in refused):
            fix = (f"use the original options, a new --out folder, or --train.allow-change {','.join(refused)} "
                   "to continue with the new value on purpose (docs/training.md)")
        raise PretuneError(what, str(run_dir), fix)
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed if k != "allow_change"]


def build_pretraining(model_cfg, tc: TrainConfig, data_dir: Path, seq_len: int):
    """(train batches, eval function) for the model's family."""
    from .data.shards import LMBatches, PairBatches, eval_batches
    from .objectives import pretrain_loss, pretrain_task_loss

    kind = "lm" if model_cfg.causal else "pairs"
    if kind == "lm":
        train = LMBatches(data_dir, "train", tc.batch_size, seq_len, tc.seed)
    else:
        from .tokenizer.core import Tokenizer
        tok = Tokenizer.load(data_dir)
        train = PairBatches(data_dir, "train", tc.batch_size, seq_len, tc.seed,
                            tokenizer_special=tok.special_dict(), vocab_size=tok.vocab_size)

    def eval_fn_for(model):
        def eval_fn():
            losses, parts_sum, n = 0.0, {}, 0
            for batch in eval_batches(data_dir, "val", tc.batch_size, seq_len, n_batches=tc.eval_batches,
                                      causal=model_cfg.causal):
                batch = {k: v.to(next(model.parameters()).device) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
                # val_loss is the task loss alone (L1, MLM + NSP): a router's auxiliary losses are
                # no part of the model's likelihood; they are logged apart, as val_moe_aux
                loss, parts = pretrain_task_loss(model, batch)
                aux = model.moe_losses()
                if torch.is_tensor(aux):
                    parts["moe_aux"] = aux
                losses += loss.item()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
                n += 1
            out = {"val_loss": losses / max(n, 1)}
            out.update({f"val_{k}": v / max(n, 1) for k, v in parts_sum.items()})
            return out
        return eval_fn

    return train, eval_fn_for, pretrain_loss


def pretrain(model_cfg, tc: TrainConfig, data_dir: Path, out: Path, progress: bool = True,
             hooks: list[Hook] | None = None, extra_config: dict | None = None) -> dict:
    """Pre-train a fresh model (or resume `out`), returning the final metrics."""
    from .models.transformer import Transformer
    from .tokenizer.core import Tokenizer

    out = Path(out)
    seq_len = tc.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise PretuneError(f"seq_len={seq_len} exceeds the model's window max_seq_len={model_cfg.max_seq_len}",
                           None, "lower --train.seq-len or raise --arch.max-seq-len")
    tok = Tokenizer.load(data_dir)
    if tok.vocab_size > model_cfg.vocab_size:
        raise PretuneError(f"the data's tokenizer has {tok.vocab_size} tokens but the model only "
                           f"{model_cfg.vocab_size}", str(data_dir),
                           f"set --arch.vocab-size {tok.vocab_size} or prepare the data with the model's tokenizer")
    run_config = {"model": model_cfg.to_dict(), "train": asdict(tc), "data": str(data_dir),
                  "data_sha256": data_fingerprint(data_dir),
                  "objective": "L1" if model_cfg.causal else "MLM+NSP", **(extra_config or {})}
    changes = check_resume(out, run_config)  # before anything is built or written
    resolve_device(tc.device)  # a bad --train.device fails before the run directory is made
    torch.manual_seed(tc.seed)
    model = Transformer(model_cfg)
    train, eval_fn_for, loss_fn = build_pretraining(model_cfg, tc, data_dir, seq_len)
    if changes:
        print(f"note: resuming {out} with changed options: {'; '.join(changes)}")
    make_dir(out, "the run directory")
    atomic_write_json(out / "config.json", run_config)
    if not (out / "tokenizer.json").exists():
        tok.save(out)
    all_hooks = list(hooks or [])
    try:
        from .compute import MFUHook  # the cost planner's live MFU, where it is available
        all_hooks.insert(0, MFUHook(model_cfg, seq_len, tc.precision))
    except ImportError:
        pass
    if model_cfg.n_expert:  # routers' expert loads, drops and entropy -> metrics.jsonl, moe.png
        from .training.hooks import MoEStatsHook
        all_hooks.append(MoEStatsHook())
    if tc.guard:  # loss spikes and non-finite losses -> roll back, skip the data, lower the lr
        from .guard import LossGuard
        all_hooks.append(LossGuard.from_config(tc))
    trainer = Trainer(model, tc, train, loss_fn, out, eval_fn=None, hooks=all_hooks,
                      run_config=run_config, progress=progress,
                      tokens_per_batch=tc.batch_size * seq_len)
    trainer.eval_fn = eval_fn_for(trainer.model)
    return trainer.fit()


def default_data_dir(tokenizer: str, root: Path = Path("runs/data")) -> Path:
    return root / f"builtin-{tokenizer}"


def pretrain_cmd(model: str = "gpt-mini", arch: ModelConfig = None, train: TrainConfig = None,
                 data: Path | None = None, out: Path | None = None) -> dict:
    """Pre-train a GPT (L1) or BERT (MLM + NSP) from scratch; rerun the same command to resume.

    The optimiser and schedule are the preset's recipe (docs/training.md); --train.* overrides any.

    Args:
        model: a preset name (gpt-mini, bert-mini, gpt2, bert-base, ...) or a config.json path
        data: a folder made by `pretune prepare` (default: the built-in corpus, prepared on first use)
        out: the run directory (default: runs/<model>)
    """
    from .config.presets import preset

    if model.endswith(".json"):
        cfg = ModelConfig.load(model)
        cfg = cfg.replace(**(arch or {})) if arch else cfg
    else:
        cfg = preset(model, **(arch or {}))
    tc = TrainConfig.for_model(cfg, train)  # the preset's recipe under --train.* (recipes.py)
    out = Path(out or f"runs/{cfg.name}")
    check_creatable(out, "the run directory")  # before the built-in corpus is prepared
    if data is None:
        from .data.shards import prepare
        data = default_data_dir(cfg.tokenizer)
        if not (data / "meta.json").exists():
            prepare(["builtin"], cfg.tokenizer, data)
    final = pretrain(cfg, tc, Path(data), out)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()}))
    print(f"run directory: {out}")
    return final
