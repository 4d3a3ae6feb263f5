"""Multiple choice by log-likelihood: each choice scored as the continuation of the context,
`acc` (the highest log-likelihood) and `acc_norm` (divided by the choice's length in characters),
as lm-evaluation-harness's `multiple_choice` output type computes them (api/task.py,
process_results: `lls / completion_len`, np.argmax so a tie goes to the first choice).

A task file is .jsonl, one example a line: {"context": str, "choices": [str, ...], "gold": int
or one of the choices}; each continuation is `delimiter + choice` (the harness's
target_delimiter, a space by default)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PretuneError


@dataclass(frozen=True)
class Choice:
    context: str
    choices: tuple[str, ...]
    gold: int


def parse_example(d, where: str) -> Choice:
    """One example from a dict, checked: a context, at least two choices, a gold among them."""
    if not isinstance(d, dict):
        raise PretuneError("an example is not a JSON object", where, 'write {"context": ..., "choices": [...], "gold": 0}')
    for key in ("context", "choices", "gold"):
        if key not in d:
            raise PretuneError(f"the example has no '{key}'", where,
                               'write {"context": ..., "choices": [...], "gold": 0} on every line')
    ch = d["choices"]
    if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
        raise PretuneError("'choices' must be a list of at least two non-empty strings", where,
                           'write e.g. "choices": ["yes", "no"]')
    g = d["gold"]
    if isinstance(g, str):
        if g not in ch:
            raise PretuneError(f"the gold '{g}' is not one of the choices ({', '.join(ch)})", where,
                               "give the gold as one of the choices or as its index from 0")
        g = ch.index(g)
    elif not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < len(ch):
        raise PretuneError(f"the gold {g!r} is outside the {len(ch)} choices", where,
                           f"give an index from 0 to {len(ch) - 1}, or the choice's text")
    return Choice(str(d["context"]), tuple(ch), g)


def read_choices(path: str | Path) -> list[Choice]:
    """The examples of a .jsonl multiple-choice task file."""
    p = Path(path)
    if not p.is_file():
        raise PretuneError("no such task file", str(p), 'give a .jsonl of {"context", "choices", "gold"}')
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise PretuneError(f"line {n} is not JSON ({e.msg})", str(p), "write one JSON object a line") from e
        out.append(parse_example(d, f"{p} line {n}"))
    if not out:
        raise PretuneError("the task file holds no examples", str(p), "write one example a line")
    return out


def choice_pairs(examples, delimiter: str = " ") -> list[tuple[str, str]]:
    """The (context, continuation) requests, choice after choice, example after example."""
    return [(e.context, delimiter + c) for e in examples for c in e.choices]


def argmax(xs) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # ties: the first, like np.argmax


def mc_metrics(examples, scored) -> dict:
    """acc, acc_norm and the per-example predictions from the scored requests (choice_pairs' order)."""
    k, acc, norm, preds = 0, 0, 0, []
    for e in examples:
        lls = [s.loglik for s in scored[k:k + len(e.choices)]]
        k += len(e.choices)
        p = argmax(lls)
        pn = argmax([ll / len(c) for ll, c in zip(lls, e.choices)])
        acc += p == e.gold
        norm += pn == e.gold
        preds.append({"loglik": lls, "pred": p, "pred_norm": pn, "gold": e.gold})
    n = len(examples)
    return {"acc": acc / max(n, 1), "acc_norm": norm / max(n, 1), "n": n, "examples": preds}


def evaluate_choices(model, tok, examples, delimiter: str = " ", batch_size: int = 16,
                     truncate: str | None = None, where: str = "the task") -> dict:
    from .loglikelihood import score_pairs
    scored = score_pairs(model, tok, choice_pairs(examples, delimiter), batch_size, truncate, where=where)
    return mc_metrics(examples, scored)
