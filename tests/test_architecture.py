"""The package layout holds: the import graph of src/pretune and src/pretune_bench, read with `ast`,
against the layers that docs/architecture.md declares (its ```layers, ```peers and ```lazy blocks).

Every `import` and `from ... import` counts, at module level and inside functions (a function-level
import is still a dependency, only a later one), relative ones resolved; so do the "module:function"
targets of the cli's VERBS table and literal `importlib.import_module("...")` arguments. It fails on
an import cycle (printed), an edge from a lower layer to a higher one, a cross-package edge inside
one layer that the doc does not list, a module no layer declares, a module over 500 lines, any
import of transformers / peft / lm_eval inside src/pretune (the library never needs them: interop
reads the files directly; only pretune_bench compares against transformers), and a module declared
torch-free (```torch-free: the cost planner, the counting) that loads torch.

The checker is tested on small synthetic trees too, so that each rule is seen to fail.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 500
FORBIDDEN = ("transformers", "peft", "lm_eval")  # never imported by the library (src/pretune)


# ---- reading the declaration --------------------------------------------------------------

@dataclass
class Declaration:
    layers: list[tuple[int, str, list[str]]]  # (level, name, globs)
    peers: set[tuple[str, str]] = field(default_factory=set)  # (package, package) allowed inside one layer
    lazy: set[tuple[str, str]] = field(default_factory=set)  # (module, module) allowed upward, in functions only
    torch_free: list[str] = field(default_factory=list)  # globs of modules that import no torch at load time


def _block(text: str, kind: str) -> list[str]:
    m = re.search(rf"^```{kind}\s*\n(.*?)^```", text, re.S | re.M)
    if not m:
        return []
    return [l.split("#", 1)[0].strip() for l in m.group(1).splitlines() if l.split("#", 1)[0].strip()]


def parse_declaration(text: str) -> Declaration:
    layers = []
    for line in _block(text, "layers"):
        m = re.fullmatch(r"L(\d+)\s+([\w-]+)\s*:\s*(.+)", line)
        assert m, f"bad layer line in docs/architecture.md: {line!r} (want 'L<n> <name>: <globs>')"
        layers.append((int(m.group(1)), m.group(2), [g.strip() for g in m.group(3).split(",") if g.strip()]))
    assert layers, "docs/architecture.md has no ```layers block"
    pairs = {}
    for kind in ("peers", "lazy"):
        out = set()
        for line in _block(text, kind):
            a, arrow, b = line.partition("->")
            assert arrow, f"bad {kind} line in docs/architecture.md: {line!r} (want 'a -> b')"
            out.add((a.strip(), b.strip()))
        pairs[kind] = out
    return Declaration(layers, pairs["peers"], pairs["lazy"],
                       [g.strip() for line in _block(text, "torch-free") for g in line.split(",") if g.strip()])


def _matches(module: str, glob: str) -> bool:
    """`pkg/` is the package and everything in it; anything else is an fnmatch of the dotted name."""
    if glob.endswith("/"):
        p = glob[:-1]
        return module == p or module.startswith(p + ".")
    return fnmatch.fnmatchcase(module, glob)


def layer_of(module: str, decl: Declaration) -> tuple[int, str] | None:
    for level, name, globs in decl.layers:
        if any(_matches(module, g) for g in globs):
            return level, name
    return None


def package_of(module: str) -> str:
    """The first component: `models.heads` -> models; `pretune_bench.suite` -> pretune_bench."""
    return module.split(".")[0]


# ---- reading the code ------------------------------------------------------------------------

@dataclass
class Edge:
    src: str
    dst: str
    line: int
    lazy: bool  # inside a function (or a string target): imported only when called


@dataclass
class Module:
    name: str  # "models.heads" for pretune's; "pretune_bench.suite" for the sibling package
    path: Path
    lines: int
    edges: list[Edge]
    forbidden: list[tuple[str, int]]  # (imported name, line)
    torch_line: int | None = None  # the line of a module-level `import torch` (or from torch ...)


def _name(pkg_root: str, rel: Path) -> tuple[str, bool]:
    parts = list(rel.with_suffix("").parts)
    ispkg = parts[-1] == "__init__"
    if ispkg:
        parts = parts[:-1]
    full = ".".join([pkg_root, *parts])
    return full, ispkg


def _short(full: str) -> str:
    """pretune.models.heads -> models.heads; pretune -> __init__; pretune_bench.x stays."""
    if full == "pretune":
        return "__init__"
    if full.startswith("pretune."):
        return full[len("pretune."):]
    return full


def _resolve(full: str, ispkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = full.split(".")
    if not ispkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_tree(src: Path, packages=("pretune", "pretune_bench")) -> dict[str, Module]:
    """Every module of `packages` under `src`, with its outgoing edges to other modules of them."""
    files = {}
    for pkg in packages:
        for p in sorted((src / pkg).rglob("*.py")):
            full, ispkg = _name(pkg, p.relative_to(src / pkg))
            files[full] = (p, ispkg)
    known = set(files)

    def target(name: str) -> str | None:
        """The module an imported dotted name lands in: the longest known prefix."""
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            cand = ".".join(parts[:k])
            if cand in known:
                return cand
        return None

    out = {}
    for full, (p, ispkg) in files.items():
        text = p.read_text(encoding="utf-8")
        tree = ast.parse(text)
        edges, forbidden = [], []
        torch_at: list[int] = []  # lines of module-level torch imports

        def add(name: str, line: int, lazy: bool):
            t = target(name)
            if t is not None and t != full:
                edges.append(Edge(_short(full), _short(t), line, lazy))

        def visit(node, in_function: bool):
            for ch in ast.iter_child_nodes(node):
                lazy = in_function or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(ch, (ast.Import, ast.ImportFrom)) and not in_function:
                    names = [a.name for a in ch.names] if isinstance(ch, ast.Import) else [ch.module or ""]
                    if getattr(ch, "level", 0) == 0 and any(n.split(".")[0] == "torch" for n in names):
                        torch_at.append(ch.lineno)
                if isinstance(ch, ast.Import):
                    for a in ch.names:
                        add(a.name, ch.lineno, in_function)
                        if a.name.split(".")[0] in FORBIDDEN:
                            forbidden.append((a.name, ch.lineno))
                elif isinstance(ch, ast.ImportFrom):
                    base = _resolve(full, ispkg, ch)
                    if base.split(".")[0] in FORBIDDEN:
                        forbidden.append((base, ch.lineno))
                    for a in ch.names:  # `from pkg import module` lands in the module
                        add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, ch.lineno, in_function)
                elif isinstance(ch, ast.Call):
                    f = ch.func
                    fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    if fname == "import_module" and ch.args and isinstance(ch.args[0], ast.Constant) \
                            and isinstance(ch.args[0].value, str):
                        add(ch.args[0].value, ch.lineno, True)
                elif isinstance(ch, (ast.Assign, ast.AnnAssign)):
                    tg = ch.targets[0] if isinstance(ch, ast.Assign) else ch.target
                    if isinstance(tg, ast.Name) and tg.id == "VERBS" and isinstance(ch.value, ast.Dict):
                        for v in ch.value.values:  # "module:function", imported when the verb runs
                            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                                add(v.value.split(":")[0], v.lineno, True)
                visit(ch, lazy)

        visit(tree, False)
        out[_short(full)] = Module(_short(full), p, len(text.splitlines()), edges, forbidden,
                                 torch_at[0] if torch_at else None)
    return out


# ---- the rules --------------------------------------------------------------------------------

def _cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as one cycle through it."""
    graph = {m: sorted({e.dst for e in mods[m].edges if e.dst in mods}) for m in mods}
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:  # one concrete cycle through the component, for the message
        inside = set(comp)
        start = min(comp)
        path, seen = [start], {start}
        while True:
            nxt = next((w for w in graph[path[-1]] if w in inside and (w == start or w not in seen)), None)
            if nxt is None or nxt == start:
                break
            path.append(nxt)
            seen.add(nxt)
        cycles.append(path + [start])
    return cycles


def _torch_at_load(m: str, mods: dict[str, Module]) -> list[str] | None:
    """The chain of module-level imports from `m` to one that imports torch at module level, or None."""
    seen, todo = {m: [m]}, [m]
    while todo:
        v = todo.pop(0)
        if mods[v].torch_line is not None:
            return seen[v]
        for e in mods[v].edges:
            if not e.lazy and e.dst in mods and e.dst not in seen:
                seen[e.dst] = seen[v] + [e.dst]
                todo.append(e.dst)
    return None


def violations(mods: dict[str, Module], decl: Declaration) -> list[str]:
    out = []
    for cyc in _cycles(mods):
        out.append("import cycle: " + " -> ".join(cyc))
    for m in sorted(mods):
        mod = mods[m]
        lay = layer_of(m, decl)
        if lay is None:
            out.append(f"{m}: no layer of docs/architecture.md declares it")
        if mod.lines > MAX_LINES:
            out.append(f"{m}: {mod.lines} lines, more than {MAX_LINES}: split it along a concept")
        if any(_matches(m, g) for g in decl.torch_free):
            chain = _torch_at_load(m, mods)
            if chain:
                out.append(f"{m}: imports torch when loaded ({' -> '.join(chain)}, line "
                           f"{mods[chain[-1]].torch_line}); docs/architecture.md declares it torch-free")
        if not m.startswith("pretune_bench"):
            for name, line in mod.forbidden:
                out.append(f"{m}:{line}: imports {name}, which the library must not need")
        for e in mod.edges:
            dl = layer_of(e.dst, decl)
            if lay is None or dl is None:
                continue
            if (e.src, e.dst) in decl.lazy:
                if not e.lazy:
                    out.append(f"{e.src}:{e.line}: imports {e.dst} at module level; it is allowed only "
                               "inside a function (docs/architecture.md, ```lazy)")
                continue
            if dl[0] > lay[0]:
                out.append(f"{e.src}:{e.line}: imports {e.dst}, a higher layer "
                           f"(L{lay[0]} {lay[1]} -> L{dl[0]} {dl[1]})")
            elif dl[0] == lay[0] and package_of(e.src) != package_of(e.dst) and \
                    (package_of(e.src), package_of(e.dst)) not in decl.peers:
                out.append(f"{e.src}:{e.line}: imports {e.dst}, a peer package in layer L{lay[0]} "
                           f"that docs/architecture.md does not list (```peers)")
    return list(dict.fromkeys(out))


# ---- the real tree ----------------------------------------------------------------------------

def test_the_package_layout_holds():
    decl = parse_declaration(DOC.read_text(encoding="utf-8"))
    mods = read_tree(ROOT / "src")
    assert len(mods) > 60 and "training.loop" in mods and "pretune_bench.suite" in mods
    problems = violations(mods, decl)
    assert not problems, "\n" + "\n".join(problems)


def test_every_declared_peer_and_lazy_edge_is_used():
    """A listed exception that no import uses any more is stale: remove it from the doc."""
    decl = parse_declaration(DOC.read_text(encoding="utf-8"))
    mods = read_tree(ROOT / "src")
    used_peers = {(package_of(e.src), package_of(e.dst)) for m in mods.values() for e in m.edges}
    used_lazy = {(e.src, e.dst) for m in mods.values() for e in m.edges}
    assert decl.peers - used_peers == set()
    assert decl.lazy - used_lazy == set()


# ---- the checker fails where it should (synthetic trees) ---------------------------------------

SYNTH_DOC = """
```layers
L0 base: errors
L1 models: models/
L2 training: training/
L3 top: cli/, __init__
L4 outside: pretune_bench/
```

```peers
```

```lazy
cli.bench -> pretune_bench.suite
```

```torch-free
models.net
```
"""

GOOD = {
    "pretune/__init__.py": "from .models.net import Net\n",
    "pretune/errors.py": "class E(Exception):\n    pass\n",
    "pretune/models/__init__.py": "",
    "pretune/models/net.py": "from ..errors import E\n\ndef f():\n    import torch\n",
    "pretune/training/__init__.py": "",
    "pretune/training/loop.py": "import torch\nfrom ..models import net\n\ndef f():\n    from ..errors import E\n",
    "pretune/cli/__init__.py": "VERBS = {'train': 'pretune.training.loop:f'}\n",
    "pretune/cli/bench.py": "def bench():\n    from pretune_bench.suite import run\n",
    "pretune_bench/__init__.py": "",
    "pretune_bench/suite.py": "import transformers\nfrom pretune.models.net import Net\n",
}


def _tree(tmp_path, files) -> Path:
    for rel, text in files.items():
        p = tmp_path / "src" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path / "src"


def test_the_checker_passes_a_good_tree(tmp_path):
    mods = read_tree(_tree(tmp_path, GOOD))
    assert violations(mods, parse_declaration(SYNTH_DOC)) == []
    # what it read: relative imports resolved, function-level ones and the VERBS target too
    assert {(e.dst, e.lazy) for e in mods["training.loop"].edges} == {("models.net", False), ("errors", True)}
    assert [(e.dst, e.lazy) for e in mods["cli"].edges] == [("training.loop", True)]


@pytest.mark.parametrize("path, text, expected", [
    # (1) a cycle, even through a function-level import
    ("pretune/models/net.py", "from ..errors import E\n\ndef g():\n    from ..training import loop\n",
     "import cycle: models.net -> training.loop -> models.net"),
    # (2) a lower layer importing a higher one
    ("pretune/errors.py", "from .models import net\n", "errors:1: imports models.net, a higher layer"),
    # (2) through the VERBS table or importlib.import_module, as a string
    ("pretune/models/net.py", "import importlib\nM = importlib.import_module('pretune.cli.bench')\n",
     "models.net:2: imports cli.bench, a higher layer"),
    # (2) the one upward exception, used at module level instead of inside the verb
    ("pretune/cli/bench.py", "from pretune_bench.suite import run\n", "cli.bench:1: imports pretune_bench.suite at module level"),
    # (2) an upward import the doc does not allow at all
    ("pretune/cli/__init__.py", "def f():\n    import pretune_bench.suite\n", "cli:2: imports pretune_bench.suite, a higher layer"),
    # (3) a module no layer declares
    ("pretune/extra.py", "x = 1\n", "extra: no layer of docs/architecture.md declares it"),
    # (4) a module over 500 lines
    ("pretune/models/big.py", "x = 1\n" * 501, "models.big: 501 lines, more than 500"),
    # (5) transformers (or peft, lm_eval) inside the library, even lazily
    ("pretune/models/net.py", "def load():\n    from transformers import AutoModel\n",
     "models.net:2: imports transformers, which the library must not need"),
    ("pretune/models/net.py", "import peft.tuners\n", "models.net:1: imports peft.tuners"),
    # a module declared torch-free that loads torch, itself or through a module-level import
    ("pretune/errors.py", "import torch.nn\n", "models.net: imports torch when loaded (models.net -> errors, line 1)"),
    # a cross-package edge inside one layer that the doc does not list
    ("pretune/cli/__init__.py", "from .. import Net\n", "cli:1: imports __init__, a peer package in layer L3"),
])
def test_the_checker_fails_each_rule(tmp_path, path, text, expected):
    files = {**GOOD, path: text}
    got = violations(read_tree(_tree(tmp_path, files)), parse_declaration(SYNTH_DOC))
    assert any(expected in v for v in got), got


def test_a_listed_peer_edge_passes(tmp_path):
    files = {**GOOD, "pretune/cli/__init__.py": "from .. import Net\n"}
    doc = SYNTH_DOC.replace("```peers\n```", "```peers\ncli -> __init__\n```")
    assert violations(read_tree(_tree(tmp_path, files)), parse_declaration(doc)) == []
