"""The run directory, and the one place that knows its layout.

    RUN/run.json            {"format": "pretune-run", "version": 2, "model": {...}, "train": {...}, ...}
    RUN/tokenizer.json      the tokenizer (Hugging Face `tokenizers` format)
    RUN/metrics.jsonl       one JSON object per logged step
    RUN/results.json        a fine-tuned run's test results
    RUN/checkpoints/step-NNNNNN/   weights, state, model.json + tokenizer.json (self-contained)

The run's file is `run.json`, not `config.json`: a folder holding a `config.json` looks like a
Hugging Face model, and one that is must not be taken for a run (it is imported instead). A run
written before version 2 has `config.json` with no format key: it is read as version 1, the same
content. Paths a run records (its data, its init, an import's source, a task file, the
tokenizer) are stored relative to the run directory, so a moved run still resolves them.
Torch-free: the cost planner reads a run's model through this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import PretuneError
from ..fileio import atomic_write_json

FORMAT, VERSION = "pretune-run", 2
CHECKPOINT_FORMAT = "pretune-checkpoint"

# (section, key) of the run config whose value is a path on disk (stored relative to the run dir)
PATH_KEYS = (("data",), ("finetune", "init"), ("finetune", "origin"), ("source", "path"),
             ("task", "source"), ("model", "tokenizer"))


def _relative(value: str, root: Path) -> str:
    """`value` relative to `root` if it names something on disk (absolute, or relative to the
    working directory), else unchanged (a preset or tokenizer name). "PATH (note)" keeps the note."""
    head, sep, tail = value.partition(" (")
    if not head or not (os.path.isabs(head) or os.path.exists(head)):
        return value
    return os.path.relpath(os.path.abspath(head), os.path.abspath(root)) + sep + tail


class RunDir:
    """A run directory (pretrained, fine-tuned or imported), or one checkpoint folder of one."""

    CONFIG, LEGACY_CONFIG = "run.json", "config.json"
    TOKENIZER, METRICS, RESULTS, CHECKPOINTS = "tokenizer.json", "metrics.jsonl", "results.json", "checkpoints"
    MODEL, MANIFEST = "model.json", "manifest.json"  # inside a checkpoint folder

    def __init__(self, path: str | Path):
        self.root = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- what the folder is ------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        """run.json, or an old run's config.json (version 1) when only that exists."""
        new, old = self.root / self.CONFIG, self.root / self.LEGACY_CONFIG
        return old if not new.exists() and old.exists() else new

    def is_checkpoint(self) -> bool:
        """One checkpoint folder (`checkpoints/step-N/`, or a copy of one)."""
        return (self.root / self.MANIFEST).is_file() and (self.root / "model.safetensors").is_file()

    def run(self) -> "RunDir":
        """The run a checkpoint folder belongs to (its grandparent), else this folder."""
        return RunDir(self.root.parent.parent) if self.is_checkpoint() else self

    def is_run(self) -> bool:
        """A pretune run (or a checkpoint folder of one): not a Hugging Face folder's config.json."""
        if self.is_checkpoint():
            return (self.root / self.MODEL).is_file() or self.run().is_run()
        f = self.config_file
        if not f.is_file():
            return False
        if f.name == self.CONFIG:
            return True
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            return True  # a damaged run's file: reading it says what is wrong
        return isinstance(d, dict) and "model_type" not in d

    def exists(self) -> bool:
        return self.root.is_dir() and self.is_run()

    # ---- the config --------------------------------------------------------------------
    def read_config(self, missing_ok: bool = False) -> dict | None:
        """The run's config without its format keys (version 1 and 2 read alike); a checkpoint
        folder's own model.json, else its run's. A newer version is refused."""
        if self.is_checkpoint():
            own = self.root / self.MODEL
            if own.is_file():
                return self._load(own, CHECKPOINT_FORMAT)
            return self.run().read_config(missing_ok)
        f = self.config_file
        if not f.is_file():
            if missing_ok:
                return None
            raise PretuneError(f"not a run directory (no {self.CONFIG})", str(self.root),
                               "pass a folder made by `pretune pretrain`, `finetune` or `import`")
        d = self._load(f, FORMAT if f.name == self.CONFIG else None)
        if f.name == self.LEGACY_CONFIG and "model_type" in d:
            raise PretuneError("a Hugging Face model folder, not a pretune run", str(self.root),
                               f"import it first: pretune import hf:{self.root} --out RUN")
        if f.name == self.LEGACY_CONFIG:  # version 1: paths as written (relative to the working folder)
            d = self.portable(d)
        return d

    def _load(self, f: Path, fmt: str | None) -> dict:
        try:
            d = json.loads(f.read_text())
        except ValueError as e:
            raise PretuneError(f"{f.name} is not valid JSON: {e}", str(f), "restore it or start a new run")
        except OSError as e:
            raise PretuneError(f"cannot read {f.name}: {e.strerror}", str(f), "check the permissions")
        if not isinstance(d, dict):
            raise PretuneError(f"{f.name} is not a mapping", str(f), "restore it or start a new run")
        if fmt is not None:
            if d.get("format") not in (fmt, None):
                raise PretuneError(f"{f.name} has format '{d.get('format')}', not '{fmt}'", str(f),
                                   "pass a folder made by pretune")
            v = d.get("version", 1)
            if not isinstance(v, int) or v > VERSION:
                raise PretuneError(f"{f.name} is format version {v}; this pretune reads version {VERSION} "
                                   "and older", str(f), "upgrade pretune to read this run")
        return {k: v for k, v in d.items() if k not in ("format", "version")}

    def portable(self, d: dict) -> dict:
        """`d` with each path of PATH_KEYS relative to the run directory (a copy)."""
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
        for keys in PATH_KEYS:
            sect = out if len(keys) == 1 else out.get(keys[0])
            k = keys[-1]
            if isinstance(sect, dict) and isinstance(sect.get(k), str):
                sect[k] = _relative(sect[k], self.root)
        return out

    def path(self, value: str | Path | None) -> Path | None:
        """A path the run recorded (relative to the run directory), as a usable path."""
        if value is None or str(value) == "":
            return None
        p = Path(value)
        return p if p.is_absolute() else Path(os.path.normpath(self.root / p))

    def write_config(self, d: dict) -> dict:
        """run.json, atomically, its paths relative to the run directory; an old config.json goes
        (the new file says the same). Returns what was written, without the format keys."""
        d = self.portable({k: v for k, v in d.items() if k not in ("format", "version")})
        atomic_write_json(self.root / self.CONFIG, {"format": FORMAT, "version": VERSION, **d})
        legacy = self.root / self.LEGACY_CONFIG
        if legacy.is_file():
            legacy.unlink()
        return d

    def write_checkpoint_config(self, folder: Path, d: dict) -> None:
        """A checkpoint's model.json: the model and what rebuilds a fine-tuned run's classifier.
        Its paths are made relative to the checkpoint folder; the run's own tokenizer is the
        checkpoint's copy."""
        keep = {k: (dict(d[k]) if isinstance(d[k], dict) else d[k])
                for k in ("model", "objective", "task", "finetune", "source") if k in d}
        where = os.path.abspath(self.checkpoint(0).parent / Path(folder).name)
        for keys in PATH_KEYS:
            sect = keep if len(keys) == 1 else keep.get(keys[0])
            if isinstance(sect, dict) and isinstance(sect.get(keys[-1]), str):
                head, sep, tail = sect[keys[-1]].partition(" (")
                p = self.path(head)
                if p is None or not (Path(head).is_absolute() or p.exists()):
                    continue
                if os.path.abspath(p) == os.path.abspath(self.root / self.TOKENIZER):
                    sect[keys[-1]] = self.TOKENIZER + sep + tail
                else:
                    sect[keys[-1]] = os.path.relpath(os.path.abspath(p), where) + sep + tail
        atomic_write_json(Path(folder) / self.MODEL, {"format": CHECKPOINT_FORMAT, "version": VERSION, **keep})

    def model_config(self, where: str | None = None):
        """The run's ModelConfig; a tokenizer path it names resolved against the run directory."""
        from ..config.model import ModelConfig
        d = self.read_config()
        if not isinstance(d.get("model"), dict):
            raise PretuneError(f"{self.config_file.name} has no model section", str(self.config_file),
                               "restore it or start a new run")
        m = dict(d["model"])
        tok = m.get("tokenizer")
        if isinstance(tok, str) and not os.path.isabs(tok) and (self.root / tok).exists():
            m["tokenizer"] = str((self.root / tok).resolve())
        return ModelConfig.from_dict(m, where or str(self.config_file))

    @property
    def kind(self) -> str:
        """"fine-tuned" (a task), "imported" (a source), else "pretrained"."""
        d = self.read_config()
        return "fine-tuned" if "task" in d else "imported" if "source" in d else "pretrained"

    # ---- the other files ---------------------------------------------------------------
    @property
    def tokenizer_file(self) -> Path:
        own = self.root / self.TOKENIZER
        return own if own.is_file() or not self.is_checkpoint() else self.run().root / self.TOKENIZER

    def tokenizer(self):
        """The run's Tokenizer, or None when it has no tokenizer.json."""
        from ..tokenizer.core import Tokenizer
        f = self.tokenizer_file
        return Tokenizer.load(f.parent) if f.is_file() else None

    @property
    def metrics_file(self) -> Path:
        return self.root / self.METRICS

    def metrics(self) -> list[dict]:
        """metrics.jsonl's records, up to the last complete line (a crash can cut the last one short)."""
        try:
            text = self.metrics_file.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict):
                out.append(r)
        return out

    @property
    def results_file(self) -> Path:
        return self.root / self.RESULTS

    def results(self) -> dict | None:
        try:
            d = json.loads(self.results_file.read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def write_results(self, d: dict) -> None:
        if isinstance(d.get("origin"), str):
            d = {**d, "origin": _relative(d["origin"], self.root)}
        atomic_write_json(self.results_file, d)

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / self.CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:06d}"

    def weights_sha256(self) -> str | None:
        """The SHA-256 of the weights a load of this run reads (a checkpoint folder's own, a fine-tuned
        run's best step, else the newest step), from its manifest: the run's identity as an init,
        the same wherever the run lies. None without a checkpoint."""
        if self.is_checkpoint():
            ck = self.root
        else:
            best = (self.results() or {}).get("best_step")
            steps = sorted(p for p in self.checkpoints_dir.glob("step-*") if (p / self.MANIFEST).is_file()) \
                if self.checkpoints_dir.is_dir() else []
            ck = self.checkpoint(best) if isinstance(best, int) and self.checkpoint(best) in steps else \
                (steps[-1] if steps else None)
        try:
            return json.loads((ck / self.MANIFEST).read_text())["files"]["model.safetensors"]
        except (TypeError, OSError, ValueError, KeyError):
            return None
