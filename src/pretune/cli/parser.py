"""The `pretune` command: one verb per function, options derived from signatures.

Each verb is a plain function registered in `VERBS`; its parameters become
options (`--learning-rate 3e-4`), their annotations the types, the first
paragraph of its docstring the help, and `name: description` lines under
`Args:` each option's help. A parameter typed as a dataclass (TrainConfig,
FinetuneConfig) expands into one option per field, prefixed by the parameter
name (`--train.lr 3e-4`); `Annotated[ModelConfig, "model"]` prefixes them by
that name instead, so a plain option and its field overrides share one name
(`--model gpt-mini --model.n-layer 4`). A field that is also a plain option of
the verb (finetune's `task`) is given by that option alone. The verb receives
the fields given, as a dict of overrides to apply over its preset or defaults.

`--config FILE.yaml` supplies any option from a file; the command line wins
over the file. A section holds a group's fields; under a name that is both an
option and a group, `from` is the option itself:

    model:
      from: gpt-mini      # --model gpt-mini
      n_layer: 2          # --model.n-layer 2
    train:
      steps: 200          # --train.steps 200
      lr: 3.0e-4

A spelling that was renamed (RENAMED) is answered with one line naming the new
one. Bad input (`PretuneError`) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

from ..errors import PretuneError
from .verbs import VERBS


_MISSING = object()


# Options renamed, per verb ("*": every verb), and the spelling that replaced each; a name ending in
# ".*" stands for every field of a group. On the command line and as a YAML key, an old spelling is
# answered with one line naming the new one (exit status 2).
_FT_FIELDS = ("objective", "lam", "epochs", "freeze", "patience", "train_examples", "eval_examples", "max_len",
              "scratch", "tokenizer", "dropout", "pool", "text_column", "label_column")
RENAMED: dict[str, dict[str, str]] = {
    "*": {"arch.*": "model.*"},
    "finetune": {**{k: f"train.{k}" for k in ("lr", "batch_size", "seed", "warmup", "weight_decay", "eval_every")},
                 **{k: f"finetune.{k}" for k in _FT_FIELDS}, "finetune.task": "task"},
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def renamed(verb: str, dest: str) -> str | None:
    """The spelling that replaced option `dest` (as `lr`, `arch.n_layer`) of `verb`, or None."""
    for table in (RENAMED.get(verb, {}), RENAMED["*"]):
        if dest in table:
            return table[dest]
        group, _, field = dest.partition(".")
        if field and f"{group}.*" in table:
            return table[f"{group}.*"][:-1] + field
    return None


def _refuse_renamed(verb: str, dest: str, where: str) -> None:
    new = renamed(verb, dest)
    if new is not None:
        raise PretuneError(f"option {_flag(dest)} was renamed {_flag(new)}", f"pretune {verb}{where}",
                           f"write {_flag(new)} (see pretune {verb} --help)")


def _doc_args(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    helps: dict[str, str] = {}
    if "Args:" in doc:
        cur = None
        for line in doc.split("Args:", 1)[1].splitlines():
            m = re.match(r"\s*([A-Za-z_][\w]*)\s*:\s*(.*)", line)
            if m:
                cur = m.group(1)
                helps[cur] = m.group(2)
            elif cur and line.strip():
                helps[cur] += " " + line.strip()
    return summary, helps


def _field_doc(cls) -> dict[str, str]:
    """The trailing `# comment` of each dataclass field, as its help."""
    helps = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return helps
    for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.*)$", src, re.M):
        helps[m.group(1)] = m.group(2)
    return helps


def _base_type(tp):
    """(python type, is_list) of an annotation: Optional[X] -> X, list[X] -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        return (typing.get_args(tp)[0] if typing.get_args(tp) else str), True
    if tp is typing.Any:
        return str, False
    return tp, False


def _convert(value: Any, tp, name: str):
    base, is_list = _base_type(tp)
    if is_list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(v, base, name) for v in value]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and base is not str):
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(float(value)) if isinstance(value, str) and re.fullmatch(r"[\d.]+e\d+", value) else int(value)
        if base is float:
            return float(value)
        if base is Path:
            return Path(value)
        return value if base in (str, typing.Any) or not callable(base) else base(value)
    except (TypeError, ValueError):
        raise PretuneError(f"option --{name.replace('_', '-')} expects {getattr(base, '__name__', base)}, "
                           f"got {value!r}", None, "fix the value on the command line or in the YAML file")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors become one line, status 2
        raise PretuneError(message, f"pretune {self.prog.split()[-1]}", "see --help")


def _group(tp) -> tuple[type | None, str | None]:
    """(dataclass, option prefix or None) of a parameter typed `Cls` or `Annotated[Cls, "prefix"]`."""
    prefix = None
    if typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
        prefix = next((m for m in meta if isinstance(m, str)), None)
    return (tp, prefix) if dataclasses.is_dataclass(tp) else (None, None)


def _options(fn: Callable):
    """[(dest, annotation, default, help, dataclass-parent-or-None)] for a verb."""
    hints = typing.get_type_hints(fn, include_extras=True)
    _, helps = _doc_args(fn)
    params = inspect.signature(fn).parameters.values()
    plain = {p.name for p in params if _group(hints.get(p.name, str))[0] is None}
    out = []
    for p in params:
        tp = hints.get(p.name, str)
        default = p.default if p.default is not inspect.Parameter.empty else _MISSING
        cls, prefix = _group(tp)
        if cls is not None:
            fhints = typing.get_type_hints(cls)
            fdocs = _field_doc(cls)
            for f in dataclasses.fields(cls):
                if f.name in plain:  # one knob per setting: the verb's own option gives it
                    continue
                fd = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                out.append((f"{prefix or p.name}.{f.name}", fhints[f.name], fd, fdocs.get(f.name, ""), p.name))
        else:
            if typing.get_origin(tp) is typing.Annotated:
                tp = typing.get_args(tp)[0]
            out.append((p.name, tp, default, helps.get(p.name, ""), None))
    return out


def build_parser(verb: str, fn: Callable) -> tuple[argparse.ArgumentParser, list]:
    summary, _ = _doc_args(fn)
    ap = _Parser(prog=f"pretune {verb}", description=summary, allow_abbrev=False)
    ap.add_argument("--config", help="YAML file with any of the options below (the command line wins)")
    opts = _options(fn)
    for dest, tp, default, help_, _parent in opts:
        base, is_list = _base_type(tp)
        flag = "--" + dest.replace("_", "-")
        if default is _MISSING and _parent is None and not is_list:
            ap.add_argument(dest, nargs="?", default=_MISSING, help=help_)
            continue
        if default is _MISSING and is_list:
            ap.add_argument(dest, nargs="*", default=_MISSING, help=help_)
            continue
        d = "" if default in (None, _MISSING) or _parent else f" (default: {default})"
        if base is bool:
            ap.add_argument(flag, dest=dest, nargs="?", const="true", default=_MISSING, help=help_ + d)
        else:
            ap.add_argument(flag, dest=dest, default=_MISSING, help=help_ + d)
    return ap, opts


def _load_yaml(path: str) -> dict:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise PretuneError(f"cannot read config file: {e.strerror}", path, "check the path")
    except yaml.YAMLError as e:
        raise PretuneError(f"config file is not valid YAML: {str(e).splitlines()[0]}", path, "fix its syntax")
    if not isinstance(data, dict):
        raise PretuneError("config file must hold a mapping of option: value", path, "see `--help`")
    flat = {}
    for k, v in data.items():
        if isinstance(v, dict):  # nested sections: model: {n_layer: 4}
            for k2, v2 in v.items():
                flat[f"{k}.{k2}".replace("-", "_")] = v2
        else:
            flat[k.replace("-", "_")] = v
    return flat


def call_verb(verb: str, argv: list[str]):
    if verb not in VERBS:
        import difflib
        near = difflib.get_close_matches(verb, VERBS, n=2)
        raise PretuneError(f"unknown command '{verb}'", None,
                           (f"did you mean {' or '.join(near)}? " if near else "") + f"commands: {', '.join(VERBS)}")
    mod, name = VERBS[verb].split(":")
    fn = getattr(importlib.import_module(mod), name)
    ap, opts = build_parser(verb, fn)
    known = {o[0] for o in opts}
    for a in argv:
        if a.startswith("--") and a[2:].split("=", 1)[0].replace("-", "_") not in known:
            _refuse_renamed(verb, a[2:].split("=", 1)[0].replace("-", "_"), "")
    ns = vars(ap.parse_args(argv))
    values = _load_yaml(ns.pop("config")) if ns.get("config") else {}
    ns.pop("config", None)
    for k in list(values):
        group, _, field = k.partition(".")
        if field == "from" and group in known:  # model: {from: gpt-mini, ...} is --model gpt-mini
            values[group] = values.pop(k)
    for k in values:
        if k not in known:
            _refuse_renamed(verb, k, ", in the config file")
            import difflib
            near = difflib.get_close_matches(k, known, n=1)
            raise PretuneError(f"unknown option '{k}' in the config file", None,
                               f"did you mean '{near[0]}'?" if near else "see --help")
    for k, v in ns.items():
        if v is not _MISSING:
            values[k] = v
    kwargs: dict[str, Any] = {}
    groups: dict[str, dict] = {}
    for dest, tp, default, _h, parent in opts:
        if parent is not None:
            if dest in values:
                groups.setdefault(parent, {})[dest.split(".", 1)[1]] = _convert(values[dest], tp, dest)
            continue
        if dest in values:
            kwargs[dest] = _convert(values[dest], tp, dest)
        elif default is _MISSING:
            raise PretuneError(f"missing argument '{dest}'", f"pretune {verb}", "see --help")
    for dest, _tp, _d, _h, parent in opts:
        if parent is not None:
            kwargs[parent] = groups.get(parent, {})
    return fn(**kwargs)
