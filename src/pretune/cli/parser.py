"""The `pretune` command: one verb per function, options derived from signatures.

Each verb is a plain function registered in `VERBS`; its parameters become
options (`--learning-rate 3e-4`), their annotations the types, the first
paragraph of its docstring the help, and `name: description` lines under
`Args:` each option's help. A parameter typed as a dataclass (ModelConfig,
TrainConfig) expands into one option per field, prefixed by the parameter
name (`--arch.n-layer 4`); the verb receives the fields given, as a dict of
overrides to apply over its preset or defaults. `--config FILE.yaml` supplies any option from a
file; the command line wins over the file. Bad input (`PretuneError`) prints
one line and exits with status 2.
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


def _options(fn: Callable):
    """[(dest, annotation, default, help, dataclass-parent-or-None)] for a verb."""
    hints = typing.get_type_hints(fn)
    _, helps = _doc_args(fn)
    out = []
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, str)
        default = p.default if p.default is not inspect.Parameter.empty else _MISSING
        if dataclasses.is_dataclass(tp):
            fhints = typing.get_type_hints(tp)
            fdocs = _field_doc(tp)
            for f in dataclasses.fields(tp):
                fd = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                out.append((f"{p.name}.{f.name}", fhints[f.name], fd, fdocs.get(f.name, ""), p.name))
        else:
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
    ns = vars(ap.parse_args(argv))
    values = _load_yaml(ns.pop("config")) if ns.get("config") else {}
    ns.pop("config", None)
    known = {o[0] for o in opts}
    for k in values:
        if k not in known:
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
