"""The one answer to "which model is this?": a run directory, a preset name, or a config file.

`resolve_model_config` is what every verb that names a model calls (`pretrain --model`,
`cost`, `finetune`'s init, loading a run, the transfer recipe, `export`), so each accepts the
same three kinds of spec, tried in this order:

1. an existing run directory (or one checkpoint folder of one): its model config;
   a Hugging Face folder is refused with the `pretune import hf:DIR` hint;
2. a preset name (config/presets.py);
3. a .json/.yaml/.yml file holding the fields, or {"model": {...}} (a run's own file);
   its name defaults to the file's stem.

Anything else is one line naming the near presets. Torch-free (the cost planner uses it).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from ..config.model import ModelConfig
from ..errors import PretuneError
from .layout import RunDir

FILE_SUFFIXES = (".json", ".yaml", ".yml")


def _from_file(p: Path) -> ModelConfig:
    try:
        text = p.read_text()
    except OSError as e:
        raise PretuneError(f"cannot read model config: {e.strerror}", str(p), "check the path")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # JSON or YAML syntax
        raise PretuneError(f"cannot read model config: {str(e).splitlines()[0]}", str(p),
                           f"fix its {p.suffix[1:].upper()} syntax")
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        d = d["model"]
    if not isinstance(d, dict):
        raise PretuneError("model config must be a mapping of field: value", str(p),
                           "write it as {\"n_layer\": 12, ...}")
    if "model_type" in d:
        raise PretuneError("a Hugging Face config, not a pretune model config", str(p),
                           f"import the folder first: pretune import hf:{p.parent} --out RUN")
    try:
        return ModelConfig.from_dict({"name": p.stem, **d}, str(p))
    except (TypeError, ValueError) as e:
        raise PretuneError(f"cannot count or build a model from this config: {e}", str(p), "fix the field's value")


def _run_config(p: Path) -> ModelConfig:
    rd = RunDir(p)
    cfg = rd.model_config()
    if not cfg.name or cfg.name == "custom":
        cfg = cfg.replace(name=(rd.run().root if rd.is_checkpoint() else rd.root).resolve().name)
    return cfg


def _override(cfg: ModelConfig, overrides: dict[str, Any], where: str) -> ModelConfig:
    if not overrides:
        return cfg
    import dataclasses
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        near = difflib.get_close_matches(bad[0], known, n=1)
        raise PretuneError(f"unknown model config field '{bad[0]}'", where,
                           f"did you mean '{near[0]}'?" if near else f"known fields: {', '.join(sorted(known))}")
    return cfg.replace(**overrides)


def resolve_model_config(spec: str | Path | ModelConfig, overrides: dict[str, Any] | None = None,
                         where: str = "--model") -> ModelConfig:
    """The ModelConfig a spec names (see the module docstring), with `overrides` applied."""
    from ..config.presets import PRESETS, preset

    overrides = dict(overrides or {})
    if isinstance(spec, ModelConfig):
        return _override(spec, overrides, where)
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        rd = RunDir(p)
        if rd.is_run() or (p / RunDir.LEGACY_CONFIG).is_file():  # a HF folder: read_config says import it
            return _override(_run_config(p), overrides, where)
        if s not in PRESETS:
            raise PretuneError("not a run directory (no run.json)", s,
                               "pass a folder made by `pretune pretrain`, `finetune` or `import`, or a preset name")
    if s in PRESETS:
        return preset(s, **overrides) if not set(overrides) - set(ModelConfig.__dataclass_fields__) \
            else _override(preset(s), overrides, where)
    if p.suffix.lower() in FILE_SUFFIXES or p.is_file():
        if not p.exists():
            raise PretuneError("cannot read model config: no such file", s, "check the path")
        return _override(_from_file(p), overrides, where)
    near = difflib.get_close_matches(s, PRESETS, n=3, cutoff=0.4)
    raise PretuneError(f"unknown preset '{s}': neither a run directory nor a preset nor a model config file",
                       where, (f"did you mean {', '.join(near)}? " if near else "")
                       + "give a run directory, a preset name or a .json/.yaml model config")
