"""Checkpoints that cannot be half-written, and the run directory around them.

    RUN/run.json                        the full resolved config ({"format": "pretune-run", "version": 2,
                                        "model": ..., "train": ..., ...}; runs/layout.py)
    RUN/tokenizer.json                  the tokenizer (Hugging Face `tokenizers` format)
    RUN/metrics.jsonl                   one JSON object per logged step
    RUN/checkpoints/step-NNNNNN/
        model.safetensors               weights (the tied W_e stored once, re-tied on load)
        optimizer.safetensors           optimizer moments, as tensors
        rng.safetensors                 torch CPU (and CUDA) RNG states, as uint8 tensors
        state.json                      step, scheduler, loss scaler, data position, optimizer hyper-params
        model.json, tokenizer.json      the model config and the tokenizer: the folder alone loads
        manifest.json                   SHA-256 of every file above; written last

A checkpoint is assembled in `checkpoints/.tmp-step-NNNNNN/`, every file
fsynced, the manifest written last, then the folder is renamed into place.
A folder without a valid manifest is never loaded: a crash at any moment
leaves the previous checkpoint as the latest good one. A re-save of the same
step (after a rollback, or a stop right after a periodic save) moves the old
folder aside before the new one is renamed in, so there is no moment without
a good copy. Leftover `.tmp-*` folders of a crashed save are ignored by the
readers and removed by the next writer.

Loading checks before it reads: the manifest's SHA-256 of every file, that
its names stay inside the checkpoint folder, that the folder holds no pickle
(`safety.refuse_pickles`), and each safetensors header against the file size
(`safety.check_safetensors`). Fault points (`fault_point`) let tests kill the
process at named moments; see docs/robustness.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file, save_model
from safetensors.torch import load_model as load_safetensors_into

from ..errors import PretuneError
from ..fileio import atomic_dir, atomic_write_json
from ..safety import check_safetensors, contained, load_safetensors, refuse_pickles


STEP_RE = re.compile(r"^step-(\d{6,})$")


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


FAULT_POINTS = ("after_forward", "in_optimizer_step", "after_weights", "before_manifest", "before_rename")


def fault_point(name: str) -> None:
    """A named place where a test can make the process die (PRETUNE_FAULT=name[:count]):
    at the count-th time the process passes `name` it sends itself SIGKILL, which
    nothing can catch, as a power cut or an out-of-memory kill would. Points:
    after_forward, in_optimizer_step (gradients ready, weights not yet updated), between_steps
    (a step's logging, evaluation and checkpoint done, the next step's stop agreement not yet),
    after_weights (a checkpoint's weights written, nothing else), before_manifest
    (all files written and fsynced), before_rename (manifest written, folder not
    yet in place). PRETUNE_FAULT_RANK=r: only rank r (torchrun's RANK); PRETUNE_FAULT_ONCE=file:
    only if that file does not exist yet (it is made first), so a restarted group runs through.
    PRETUNE_FAULT_PAUSE=file: instead of dying, make that file and sleep PRETUNE_FAULT_PAUSE_S seconds
    (default 2), so a test can send a signal while this process is at exactly this point."""
    spec = os.environ.get("PRETUNE_FAULT")
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    rank = os.environ.get("PRETUNE_FAULT_RANK")  # under torchrun: only this rank dies
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    once = os.environ.get("PRETUNE_FAULT_ONCE")  # a marker file: the restarted group does not die again
    if once and os.path.exists(once):
        return
    key = f"_pretune_fault_{name}"
    n = int(os.environ.get(key, "0")) + 1
    os.environ[key] = str(n)
    if n >= int(count or 1):
        import signal
        pause = os.environ.get("PRETUNE_FAULT_PAUSE")
        if pause:
            if not os.path.exists(pause):
                import time
                open(pause, "w").close()
                time.sleep(float(os.environ.get("PRETUNE_FAULT_PAUSE_S", "2")))
            return
        if once:
            open(once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


# ---- optimizer and RNG state as tensors + JSON ----------------------------

def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng(t: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(t["torch_cpu"])
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(t) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


# ---- save -----------------------------------------------------------------

def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict | None = None,
                    keep_last: int = 3, keep: set[int] | None = None,
                    tensors: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically and prune all but the newest
    `keep_last` (and the steps in `keep`, e.g. the best by validation loss). `tensors`:
    (name -> tensor, metadata) written as model.safetensors instead of `model`'s state
    (an import's int4 packs, models/packed.py; `model` may then be None)."""
    ckdir = Path(run_dir) / "checkpoints"
    final = ckdir / f"step-{step:06d}"
    tmp = ckdir / f".tmp-step-{step:06d}"
    old = ckdir / f".old-step-{step:06d}"
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        clean_partial(run_dir)
        # a re-save of the same step: the old copy (moved aside as .old-step-N) stays until the new one is in place
        with atomic_dir(final, tmp_name=tmp.name, old_name=old.name, what="the checkpoint") as tmp:
            if tensors is not None:
                save_file(tensors[0], str(tmp / "model.safetensors"), metadata=tensors[1])
            else:
                save_model(model, str(tmp / "model.safetensors"))
            fault_point("after_weights")
            if optimizer is not None:
                tensors, meta = optimizer_to_tensors(optimizer)
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                state = {**(state or {}), "optimizer": meta}
            save_file(rng_tensors(), str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=1))
            _self_contained(Path(run_dir), tmp, model)
            files = sorted(p.name for p in tmp.iterdir())
            for name in files:
                _fsync(tmp / name)
            fault_point("before_manifest")
            atomic_write_json(tmp / MANIFEST, {"step": step, "files": {n: _sha256(tmp / n) for n in files}})
            fault_point("before_rename")
    except (OSError, SafetensorError, PretuneError) as e:  # PretuneError: fileio's atomic write failed
        why = getattr(e, "strerror", None) or str(e).split(" (")[0] or type(e).__name__
        why = why.removeprefix("cannot write the checkpoint: ").removeprefix(f"cannot write {final.name}: ")
        raise PretuneError(f"cannot write checkpoint step {step}: {why}", str(ckdir),
                           "free disk space or fix permissions, then rerun the same command; "
                           "the previous checkpoint is intact") from e
    prune(run_dir, keep_last, keep or set())
    return final


def _self_contained(run_dir: Path, folder: Path, model: torch.nn.Module) -> None:
    """model.json (what is needed to rebuild the model: the run config's model section, and a
    fine-tuned run's task and head) and tokenizer.json into the checkpoint folder, so the folder
    alone loads (`models.load.load_model(folder)`) once copied away from its run."""
    from .layout import RunDir
    rd = RunDir(run_dir)
    d = rd.read_config(missing_ok=True)
    if d is not None and "model" in d:
        rd.write_checkpoint_config(folder, d)
    elif getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        rd.write_checkpoint_config(folder, {"model": model.config.to_dict()})
    if rd.tokenizer_file.is_file():
        shutil.copyfile(rd.tokenizer_file, folder / rd.TOKENIZER)


def clean_partial(run_dir: str | Path) -> list[str]:
    """Remove the `.tmp-*` / `.old-*` folders a crashed save left behind (only a writer calls this:
    a reader must not delete a save in progress). Returns the names removed."""
    ckdir = Path(run_dir) / "checkpoints"
    gone = []
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-step-") or p.name.startswith(".old-step-")):
                m = STEP_RE.match(p.name.split("-", 1)[1])
                final = ckdir / p.name.split("-", 1)[1]
                if p.name.startswith(".old-") and m and not final.exists():
                    os.replace(p, final)  # the crash came between the two renames of a re-save
                    continue
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def set_aside(run_dir: str | Path, newer_than: int) -> list[str]:
    """Rename the checkpoints after step `newer_than` (those that failed to verify when a
    resume fell back past them) to `.broken-step-N`: kept for a post-mortem, but no longer
    counted by `keep_last` nor loaded. Returns the names set aside."""
    moved = []
    for p in list_checkpoints(run_dir):
        if int(STEP_RE.match(p.name).group(1)) > newer_than:
            dest = p.parent / f".broken-{p.name}"
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(p, dest)
            moved.append(p.name)
    return moved


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    return sorted((p for p in ckdir.iterdir() if STEP_RE.match(p.name) and p.is_dir()),
                  key=lambda p: int(STEP_RE.match(p.name).group(1)))


def prune(run_dir: str | Path, keep_last: int, keep: set[int]) -> None:
    cks = list_checkpoints(run_dir)
    for p in cks[:-keep_last] if keep_last > 0 else []:
        if int(STEP_RE.match(p.name).group(1)) not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ---- verify and load ------------------------------------------------------

def verify(path: str | Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all(isinstance(d, str) for d in files.values())
    except (ValueError, KeyError, OSError, TypeError, AssertionError):
        return "unreadable manifest"
    m = STEP_RE.match(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        return f"the manifest is for step {manifest.get('step')}, not {int(m.group(1))}"
    root = path.resolve()
    for name, digest in files.items():
        f = (path / name).resolve()
        if root not in f.parents:  # a distributed checkpoint's shards lie in dcp/ (runs/dcp.py)
            return f"manifest names a path outside the checkpoint: {name}"
        if not f.is_file():
            return f"missing file {name}"
        if _sha256(f) != digest:
            return f"checksum mismatch in {name}"
    if "model.safetensors" not in files:
        return "no model.safetensors"
    return None


def warn(msg: str) -> None:
    """One `warning: ...` line on stderr: what a person reads, without Python's source path."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: str | Path, before: int | None = None) -> Path | None:
    """The newest checkpoint (at a step below `before`, if given) that verifies; each broken
    newer one is named in a warning. A checkpoint folder holding a pickle, or one that is a
    link to outside the run's checkpoints folder, is refused (PretuneError), not skipped:
    someone put it there, and a person should look."""
    ckdir = Path(run_dir) / "checkpoints"
    cands = [p for p in list_checkpoints(run_dir)
             if before is None or int(STEP_RE.match(p.name).group(1)) < before]
    for i, p in enumerate(reversed(cands)):
        if not contained(p, ckdir):
            raise PretuneError(f"checkpoint {p.name} links outside the run directory", str(p),
                               "replace the link with the checkpoint folder itself")
        refuse_pickles(p)
        problem = verify(p)
        if problem is None:
            return p
        older = i + 1 < len(cands)
        warn(f"checkpoint {p.name} is unusable ({problem})"
             + ("; falling back to the previous one" if older else "") + f" ({ckdir})")
    return None


def no_checkpoint_error(run_dir: str | Path, fix: str) -> PretuneError:
    """Why a run has no checkpoint to load: none written yet (`fix` says what to do), or every
    one written is damaged (then restoring a backup or retraining is what is left)."""
    ckdir = Path(run_dir) / "checkpoints"
    broken = [p.name for p in list_checkpoints(run_dir)]
    aside = sorted(p.name for p in ckdir.glob(".broken-step-*")) if ckdir.is_dir() else []
    if not broken and not aside:
        return PretuneError("no usable checkpoint", str(ckdir), fix)
    n = len(broken) + len(aside)
    names = ", ".join(broken + aside)
    what = ("1 checkpoint exists, but it is damaged" if n == 1
            else f"{n} checkpoints exist, but all are damaged")
    if aside:
        what += f" ({len(aside)} set aside by an earlier resume as .broken-step-N)"
    return PretuneError(f"no usable checkpoint: {what} ({names})", str(ckdir),
                        "restore the checkpoints folder from a backup, or retrain the run "
                        "(a new --out, or move the damaged folders out of checkpoints/)")


def require_checkpoint(run_dir: str | Path, fix: str) -> Path:
    """`latest_checkpoint`, or the PretuneError of `no_checkpoint_error`."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        raise no_checkpoint_error(run_dir, fix)
    return ck


PACKED_FORMAT = "pretune-int4/1"  # model.safetensors' metadata "format" of int4 packs (models/packed.py)


def stored_weights(ckpt: str | Path) -> str:
    """What a checkpoint's model.safetensors holds: "int4" for packs (`import --weights int4`),
    else "fp32" (the model's own state); reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(ckpt) / "model.safetensors"), "pt") as s:
            meta = s.metadata() or {}
    except Exception:  # a missing or damaged file: the loader names what is wrong with it
        return "fp32"
    return meta.get("weights", "int4") if meta.get("format") == PACKED_FORMAT else "fp32"


def load_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    check_safetensors(Path(ckpt) / "model.safetensors")
    if stored_weights(ckpt) != "fp32":  # fine-tuning, resuming, export: they need the trained floats
        raise PretuneError(f"the checkpoint holds {stored_weights(ckpt)} inference weights (imported with "
                           f"--weights {stored_weights(ckpt)}), not the model's floats", str(ckpt),
                           "run it with --weights int4 (generate, evaluate, serve), or import the file "
                           "again without --weights int4 to train or export it")
    try:
        missing, unexpected = load_safetensors_into(model, str(Path(ckpt) / "model.safetensors"), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:  # safetensors raises its own types for corrupt files
        raise PretuneError(f"cannot read weights: {e}", str(ckpt), "the checkpoint is damaged") from e
    if missing or unexpected:
        raise PretuneError(f"weights do not fit the model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})", str(ckpt),
                           "the checkpoint was written by a different model config")


def load_training_state(ckpt: str | Path, optimizer=None) -> dict:
    """state.json, with the optimizer and RNG states restored in place."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise PretuneError(f"cannot read state.json: {e}", str(ckpt), "the checkpoint is damaged") from e
    if optimizer is not None and (ckpt / "optimizer.safetensors").exists():
        try:
            optimizer_from_tensors(optimizer, load_safetensors(ckpt / "optimizer.safetensors"), state["optimizer"])
        except (KeyError, ValueError) as e:  # torch checks the groups' sizes against the model's
            raise PretuneError(f"the optimizer state does not fit the model: {e}", str(ckpt),
                               "the checkpoint was written by a different model config") from e
    if (ckpt / "rng.safetensors").exists():
        restore_rng(load_safetensors(ckpt / "rng.safetensors"))
    return state


def read_run_config(run_dir: str | Path) -> dict:
    """The run's config (run.json, or an old run's config.json): `RunDir.read_config`."""
    from .layout import RunDir
    return RunDir(run_dir).read_config()
