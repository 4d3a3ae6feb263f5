"""Resuming a run: what a rerun may change, and the refusal of one that would put the run on
another trajectory (docs/training.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..errors import PretuneError
from ..runs import checkpoint as ckpt
from ..runs.layout import RunDir


# What a rerun of a run with checkpoints may change (docs/training.md, "Resuming: what a rerun may
# change"). Free: no effect on the weights of any step (`steps` stretches or shortens the schedule
# from the resume step on). Deliberate: the schedule and the guard, changed only when named in
# --train.allow-change (lowering the lr after the guard gave up is the usual reason). Every other
# option that decides the trajectory (the model, seed, batch size, grad_accum, seq_len, the data,
# precision, the objective, the AdamW hyper-parameters, which the checkpoint's optimizer state
# would silently override) is refused.
RESUME_FREE = frozenset({"steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last", "device",
                         "compile", "allow_change", "parallel", "log", "activation_checkpointing"})


RESUME_DELIBERATE = frozenset({"lr", "min_lr_ratio", "warmup", "decay", "grad_clip", "guard", "guard_factor",
                               "guard_window", "guard_lr_scale", "guard_cooldown", "guard_max"})


def allowed_changes(spec) -> list[str]:
    """The option names of a --train.allow-change value ("lr,warmup")."""
    return [k.strip().replace("-", "_") for k in str(spec or "").split(",") if k.strip()]


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
        if train.get("global_batch") is not None:  # the step's batch, whatever the world size splits it into
            train = {k: v for k, v in train.items() if k not in ("batch_size", "grad_accum")}
        out.update({k: (v or model.get("max_seq_len")) if k == "seq_len" else v for k, v in train.items()})
    for k in ("objective", "data_sha256"):
        if run_config.get(k) is not None:
            out[k] = run_config[k]
    return out


def _shown(k: str, v: Any, run_config: dict, run_dir: Path | None = None) -> str:
    if k == "data_sha256":
        data = run_config.get("data")  # stored relative to the run: shown from here when it is there
        p = RunDir(run_dir).path(data) if run_dir is not None and data else None
        return f"the data {p if p is not None and p.exists() else data} (meta.json sha256 {str(v)[:12]})"
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
    if not RunDir(run_dir).config_file.exists() or not ckpt.list_checkpoints(run_dir):
        return []
    old_cfg = ckpt.read_run_config(run_dir)
    old, new = trajectory(old_cfg, extra), trajectory(run_config, extra)
    allowed = set(allowed_changes((run_config.get("train") or {}).get("allow_change")))
    changed = [k for k in old if k in new and old[k] != new[k]]
    refused = [k for k in changed if k not in RESUME_FREE and not (k in RESUME_DELIBERATE and k in allowed)]
    refused.sort(key=lambda k: k in ("data_sha256", "examples_sha256"))  # a named option first, if any changed
    if refused:
        k = refused[0]
        a, b = _shown(k, old[k], old_cfg, run_dir), _shown(k, new[k], run_config, run_dir)
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
