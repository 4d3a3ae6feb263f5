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
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import PretuneError
from ..fileio import atomic_write_text, make_dir
from ..runs import checkpoint as ckpt
from ..runs import dcp
from ..runs.layout import RunDir
from . import distributed
from .config import TrainConfig, lr_at, make_optimizer, resolve_device
from .hooks import Hook
from .selection import BY_LOSS, Selection


class Trainer:
    """Runs `loss_fn(model, batch) -> (loss, parts)` over `batches` for tc.steps optimizer steps."""

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, batches, loss_fn: Callable,
                 run_dir: str | Path, eval_fn: Callable[[], dict] | None = None,
                 hooks: list[Hook] | None = None, run_config: dict | None = None,
                 progress: bool = True, tokens_per_batch: int | None = None, select: Selection = BY_LOSS):
        self.tc, self.run_dir = tc, Path(run_dir)
        self.dp = distributed.current()  # the process group, or the one-process no-op (training/distributed.py)
        self.device = self.dp.device if self.dp.active else resolve_device(tc.device)
        self.model = model.to(self.device)
        if tc.activation_checkpointing:
            from .memory import checkpoint_blocks
            checkpoint_blocks(self.model)
        forward = self.dp.wrap(self.model, tc)  # before the optimizer: FSDP2 swaps the parameters for shards
        from ..models.moe import moe_layers
        self._moe = moe_layers(self.model) if self.dp.world > 1 else []
        for m in self._moe:  # the balancing loss over the global micro-batch (models/moe.py)
            m.group_sum = self.dp.sum
        self.batches, self.loss_fn, self.eval_fn = batches, loss_fn, eval_fn
        self.hooks = list(hooks or [])
        self.run_config = run_config or {}
        self.progress = progress and self.dp.main  # only rank 0 talks
        self.tokens_per_batch = tokens_per_batch
        self.optimizer = make_optimizer(self.model, tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.step = 0
        self.tokens = 0
        self.select = select  # which validation is the best (training/selection.py)
        self.best_score: tuple[float, ...] | None = None
        self.best_val = float("inf")  # the validation loss at best_step
        self.best_step: int | None = None
        self.improved = False  # the last evaluation became the best
        self.skipped_steps = 0  # fp16 steps GradScaler skipped; counted on the device (see the property)
        self.found_inf: torch.Tensor | None = None  # fp16: this step's overflow flag, 1.0 or 0.0 on the device
        self.stop_requested = False
        self.stop_signal: int | None = None  # SIGTERM / SIGINT received: stop at the next step boundary
        self.stopped_by: int | None = None  # the signal the ranks agreed to stop on (_loop)
        self._signals = 0  # signals this process's handler has seen
        self.rolled_back = False  # set by rollback(): the rest of this step's bookkeeping is skipped
        self.last_eval: dict = {}
        self._forward = torch.compile(forward) if tc.compile else forward
        self.board = None  # --train.log tensorboard: the event-file writer, opened in fit

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
        return RunDir(self.run_dir).metrics_file

    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl with one write() of the complete line (O_APPEND). A
        crash can leave at most a cut-short last line, which the next run drops (`_truncate_metrics`)."""
        if not self.dp.main:
            return
        if self.board is not None:
            self.board.add(record)
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
        if self.dp.main:
            ckpt.clean_partial(self.run_dir)
        self.dp.barrier()
        ck = ckpt.latest_checkpoint(self.run_dir)
        if ck is None:
            if ckpt.list_checkpoints(self.run_dir):  # written, then damaged: never silently start over
                raise ckpt.no_checkpoint_error(self.run_dir, "")
            self._truncate_metrics()  # died before its first checkpoint: step 0 again, its lines go
            return False
        state = self._restore(ck)
        for h, hs in zip(self.hooks, state.get("hooks", [])):
            h.load_state_dict(hs)
        self.dp.barrier()  # every rank has read the checkpoint before rank 0 moves any folder
        for name in ckpt.set_aside(self.run_dir, self.step) if self.dp.main else ():
            print(f"note: set the unusable checkpoint {name} aside as .broken-{name}")
        self._truncate_metrics()
        return True

    def _restore(self, ck: Path) -> dict:
        """Weights, optimizer, RNG, loss scaler, counters and data position from a checkpoint."""
        if self.dp.active or dcp.is_distributed(ck):
            state = dcp.load(ck, self.model, self.optimizer, self.dp)  # any world size, either kind of checkpoint
        else:
            ckpt.load_weights(self.model, ck)
            state = ckpt.load_training_state(ck, self.optimizer)
        self.step = state["step"]
        self.tokens = state.get("tokens", 0)
        self.best_val = state.get("best_val", float("inf"))
        self.best_step = state.get("best_step")
        score = state.get("best_score")  # before selections, the best was the lowest loss alone
        if score is None and self.select == BY_LOSS and self.best_step is not None:
            score = [self.best_val]
        self.best_score = None if score is None else tuple(score)
        self.skipped_steps = state.get("skipped_steps", 0)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if state.get("data") is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["data"])
        return state

    def _truncate_metrics(self) -> None:
        """Metrics logged after the current step belong to a future that did not happen."""
        mp = self._metrics_path()
        if self.dp.main and mp.exists():
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
        for r in RunDir(self.run_dir).metrics():
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
            "best_score": None if self.best_score is None else list(self.best_score),
            "skipped_steps": self.skipped_steps,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "data": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None,
            "hooks": [h.state_dict() for h in self.hooks],
        }
        keep = {self.best_step} if self.best_step is not None else set()
        if self.dp.active:
            path = dcp.save(self.run_dir, self.step, self.model, self.optimizer, state, self.dp,
                            keep_last=self.tc.keep_last, keep=keep)
        else:
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
        score = self.select.score(metrics)
        self.improved = score is not None and (self.best_score is None or score < self.best_score)
        if self.improved:
            self.best_score, self.best_step = score, self.step
            self.best_val = metrics.get("val_loss", float("inf"))
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
        micro = [next(self.batches) for _ in range(tc.grad_accum)]
        scales = self.dp.loss_scales(micro)  # global-count normalisation (training/distributed.py)
        div = 1 if scales else tc.grad_accum  # scaled terms already are shares of the step's mean
        for a, batch in enumerate(micro):
            if scales:
                batch["loss_scale"] = scales[a]
            for m in self._moe:  # a stand-in micro-batch (a short last batch) routes, but counts nothing
                m.group_weight = 0.0 if batch.get("void") else 1.0
            batch = self._to_device(batch)
            with self.dp.no_sync(self._forward, last=a == len(micro) - 1):
                with self.autocast():
                    loss, parts = self.loss_fn(self._forward, batch)
                ckpt.fault_point("after_forward")
                self.scaler.scale(loss / div).backward()
            total += loss.detach() / div
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v.detach() / div
            n = self.tokens_per_batch or batch["input_ids"].numel()
            self.tokens += n * self.dp.world
        self.scaler.unscale_(self.optimizer)
        if tc.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        else:
            gnorm = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in self.model.parameters()
                                   if p.grad is not None))
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP2: a DTensor
        if self.dp.world > 1:  # the step's loss over all ranks: every rank logs and guards the same number
            keys = list(parts_sum)
            both = self.dp.mean(torch.stack([total.float()] + [torch.as_tensor(parts_sum[k], device=self.device)
                                                               .float() for k in keys]))
            total, parts_sum = both[0], {k: both[i + 1] for i, k in enumerate(keys)}
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
        if self.dp.active:  # each rank its own stream (dropout); a resume restores each rank's
            torch.manual_seed(tc.seed + self.dp.rank)
        if self.dp.main:
            make_dir(self.run_dir, "the run directory")
        self.dp.barrier()
        resumed = self.resume()
        if resumed and self.dp.main:
            print(f"resuming {self.run_dir} from step {self.step}")
        if tc.log == "tensorboard" and self.dp.main:
            from .board import Board
            self.board = Board(self.run_dir, self.step)
        self.model.train()
        for h in self.hooks:
            h.on_start(self)
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc=self.run_dir.name)
        old_handlers = self._catch_signals()
        try:
            final = self._loop(bar)
        except BaseException as e:
            if not self._peers_left(e):
                raise
            self._stopped_alone(e)
        finally:
            self._restore_signals(old_handlers)
            if self.board is not None:
                self.board.close()
        if self.stopped_by is not None and self.step < tc.steps:
            import signal
            name = signal.Signals(self.stopped_by).name
            if self.dp.main:
                print(f"pretune: stopped by {name} at step {self.step}/{tc.steps}; checkpoint "
                      f"{RunDir(self.run_dir).checkpoint(self.step)} written; "
                      "resume with the same command", file=sys.stderr, flush=True)
            raise Preempted(128 + self.stopped_by)
        return final

    def _peers_left(self, e: BaseException) -> bool:
        """A collective failed (gloo: "Connection closed by peer"; DCP's CheckpointException) after
        a stop signal reached this rank: a peer was killed (the launcher's SIGKILL at the end of its
        grace period) or died. Not a new error to report: the stop the user asked for."""
        if isinstance(e, (SystemExit, KeyboardInterrupt)) or self.dp.world == 1 or self.stop_signal is None:
            return False
        return isinstance(e, RuntimeError) or type(e).__name__ == "CheckpointException"

    def _stopped_alone(self, e: BaseException) -> None:
        """The one line and 128 + the signal, as a stop that went as planned would exit; the
        checkpoint this stop was writing has no manifest, so the last complete one is used."""
        import signal
        name = signal.Signals(self.stop_signal).name
        ck = ckpt.latest_checkpoint(self.run_dir)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        print(f"pretune: stopped by {name} at step {self.step}/{self.tc.steps}; rank {self.dp.rank} lost its peers "
              f"before the checkpoint was written together ({why}); the last complete checkpoint is "
              f"{ck if ck is not None else 'none'}; resume with the same command", file=sys.stderr, flush=True)
        raise Preempted(128 + self.stop_signal) from None

    def _catch_signals(self) -> dict:
        """SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C): finish the step,
        checkpoint, stop. The handler only notes the signal: the loop decides at the next step
        boundary, where the ranks agree (_loop), so no rank leaves the loop while another is in a
        collective of the next step. A second signal stops one process at once, with the same
        exit status (the checkpoints already written stay good); in a group it changes nothing,
        since a rank leaving alone would strand the others mid-collective (torchrun's SIGKILL at the
        end of its grace period is the "at once"; docs/distributed.md). After the last step a
        signal changes nothing: the final evaluation and checkpoint are written and the run ends
        as finished."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        group = self.dp.world > 1

        def handler(signum, frame):
            name = signal.Signals(signum).name
            self._signals += 1
            if self._signals > 1 and group:
                if self.dp.main:
                    print(f"\npretune: {name} again: the ranks are already stopping together at a step boundary",
                          file=sys.stderr, flush=True)
                return
            if self._signals > 1:
                print(f"\npretune: {name} again: stopped at once at step {self.step}/{self.tc.steps}, no "
                      "checkpoint written for it; the checkpoints already written are intact; resume with "
                      "the same command", file=sys.stderr, flush=True)
                raise Preempted(128 + signum)
            if self.stop_signal is None:  # (in a group it may already be the one the ranks agreed on)
                self.stop_signal = signum
            if not self.dp.main:  # only rank 0 talks
                return
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
        while self.step < tc.steps:
            # The one place the loop stops early, the same on every rank: a hook's request or a
            # signal any rank got before this boundary (one all-reduce); a signal that comes later
            # counts at the next one (training/distributed.py: agree_stop).
            stop, sig = self.dp.agree_stop(self.stop_requested, self.stop_signal)
            if stop:
                self.stop_requested, self.stop_signal, self.stopped_by = True, sig, sig
                break
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
            ckpt.fault_point("between_steps")
        bar.close()
        final = {}
        if self.step >= tc.steps:
            # killed after the final evaluation was logged: not again (rank 0's file decides for all)
            m = self.dp.broadcast_json(self._logged_eval() if self.dp.main else None)
            if m is None:
                m = self.evaluate()
                if m:
                    self.log({"step": self.step, **m})
            final = {**(last or {}), **m}
        self.save()
        try:
            from ..runs.plots import plot_metrics
            if self.dp.main:
                plot_metrics(self.run_dir)
        except Exception as e:  # a plot must never lose a run
            print(f"note: could not draw the loss plot: {e}")
        return final


class Preempted(SystemExit):
    """Raised by `Trainer.fit` once a SIGTERM/SIGINT stop has written its checkpoint. Its exit
    status is 128 + the signal (143 for SIGTERM, 130 for SIGINT), as a shell reports a process
    a signal ended: a scheduler (Kubernetes, SLURM --requeue) then sees a run that did not
    finish, and restarts it with the same command, which resumes."""
