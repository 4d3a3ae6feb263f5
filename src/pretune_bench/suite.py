"""The suite `pretune bench` runs: the plan of benchmarks, running them, the report."""

from __future__ import annotations

import json as _json
from typing import Callable

from pretune.errors import PretuneError

from .cases import bert_mlm, generation, gpt_train, loader, tokenization, variant_gain
from .evaluation import harness_mc
from .harness import describe


def _suite(as_json: bool, only, quick: bool, rounds, threads, out=None, docs=None, from_json=None) -> dict:
    """The side-by-side suite (cases.py): medians, ratios, targets; JSON with --json; the results
    with the date and the machine written to `out`, and `docs`' table regenerated (report.py).
    `from_json`: regenerate the table from an earlier run's file instead of running."""
    from . import report

    if from_json is not None:
        if not docs:
            raise PretuneError("--from-json only regenerates a table", "pretune bench", "add --docs docs/performance.md")
        data = report.from_json(from_json)
        print(f"table regenerated in {report.regenerate(docs, data)} from {from_json}")
        return data
    try:  # the reference side of every benchmark
        import transformers  # noqa: F401
    except ImportError as e:
        raise PretuneError("the benchmark suite needs Hugging Face transformers (the reference side)",
                           "pretune bench", "pip install 'pretune[bench]'") from e
    if rounds is not None and rounds < 1:
        raise PretuneError(f"--rounds must be at least 1, got {rounds}", None, "e.g. --rounds 5")
    labels = [label for label, _, _ in suite_plan(quick)]
    if only and not any(o in label for o in only for label in labels):
        raise PretuneError(f"no benchmark matches --only {','.join(only)}", None, f"labels: {', '.join(labels)}")
    results = run_suite(only=only, quick=quick, rounds=rounds, threads=threads, progress=not as_json)
    data = report.payload(results)
    if as_json:
        print(_json.dumps(data, indent=2))
    else:
        for r in results:
            print(describe(r))
    if out:
        print(f"results in {report.write_json(out, data)}")
    if docs:
        print(f"table regenerated in {report.regenerate(docs, data)}")
    return data


# ---------------------------------------------------------------------------
# The suite, as `pretune bench` runs it
# ---------------------------------------------------------------------------

# rounds of `--quick`: every benchmark still runs, each with fewer A/B rounds (the GPT-2-small
# training rows one round: a round is 3 steps of 3-7 s on the quiet 2-core machine)
QUICK_ROUNDS = {"mini": 3, "gpt2": 1}


def suite_plan(quick: bool = False) -> list[tuple[str, Callable, dict]]:
    """(label, function, kwargs) of the standard suite, every benchmark; GPT-2-small steps take
    seconds on two cores, so that shape runs few rounds. `quick`: the same benchmarks, fewer rounds
    (QUICK_ROUNDS); the full plan is about 40-50 minutes on the quiet 2-core machine, quick about 15."""
    plan = [
        ("gpt_train mini fp32", gpt_train, dict(shape="mini", precision="fp32", rounds=7)),
        ("gpt_train mini bf16", gpt_train, dict(shape="mini", precision="bf16", rounds=7)),
        # 8 rounds: 3 of a 6-10 s step gave 69% and 51% of the in-run peaks, 8 gave 82% and 60%,
        # within a few points of the standalone peaks (docs/performance.md, "With more rounds")
        ("gpt_train gpt2 fp32", gpt_train, dict(shape="gpt2", precision="fp32", rounds=8)),
        ("gpt_train gpt2 bf16", gpt_train, dict(shape="gpt2", precision="bf16", rounds=8)),
        ("bf16 gain gpt2", variant_gain, dict(shape="gpt2", variant="bf16", rounds=3)),
        ("bf16 gain mini", variant_gain, dict(shape="mini", variant="bf16", rounds=5)),
        ("bert_mlm mini", bert_mlm, dict(shape="mini", rounds=7)),
        ("generate mini b1", generation, dict(shape="mini", batch=1, rounds=3)),
        ("generate mini b8", generation, dict(shape="mini", batch=8, rounds=3)),
        *[(f"generate mini b1 {w}", generation, dict(shape="mini", batch=1, rounds=3, weights=w))
          for w in ("bf16", "int8", "int4")],
        ("generate gpt2 b1", generation, dict(shape="gpt2", batch=1, rounds=2)),
        ("generate gpt2 b8", generation, dict(shape="gpt2", batch=8, rounds=2)),
        *[(f"generate gpt2 b1 {w}", generation, dict(shape="gpt2", batch=1, rounds=2, weights=w))
          for w in ("bf16", "int8", "int4")],
        ("harness smollm2 4-shot", harness_mc, dict(model="smollm2", shots=4, limit=40, rounds=3)),
        ("tokenize gpt2", tokenization, dict(rounds=3)),
        ("loader 16x256", loader, dict(rounds=3)),
    ]
    if quick:
        def few(fn, kw):  # the GPT-2-small shape and the lm-eval run: one round; the rest three
            return QUICK_ROUNDS["gpt2" if kw.get("shape") == "gpt2" or fn is harness_mc else "mini"]
        plan = [(label, fn, {**kw, "rounds": min(kw["rounds"], few(fn, kw))}) for label, fn, kw in plan]
    return plan


def run_suite(only: list[str] | None = None, quick: bool = False, rounds: int | None = None,
              threads: int | None = None, progress: bool = True) -> list[dict]:
    """Run the benchmarks whose label contains one of `only` (all by default)."""
    from tqdm import tqdm

    plan = [p for p in suite_plan(quick) if not only or any(o in p[0] for o in only)]
    results = []
    for label, fn, kw in tqdm(plan, desc="pretune bench", unit="bench", disable=not progress):
        kw = {**kw, "threads": threads, "progress": progress}
        if rounds:
            kw["rounds"] = rounds
        results.append(fn(**kw))
    return results
