"""What to try next: the commands that use the demo's runs, printed last, each working as printed
(tests/test_recipes.py runs every one of them against tiny runs)."""

from __future__ import annotations

import shlex
from pathlib import Path


def serve_command(runs: list[Path]) -> str | None:
    """`pretune serve RUN...` on the demo's runs (serve/cli.py: the runs are positional), or None
    where the package lacks `pretune.serve`."""
    from importlib.util import find_spec

    if find_spec("pretune.serve") is None:
        return None
    return "pretune serve " + " ".join(shlex.quote(str(r)) for r in runs)


def next_commands(gpt: Path, bert: Path, classifier: Path | None, gpt_tokens: int = 819_200) -> list[str]:
    """The commands, quoted for a POSIX shell, in the order of the story: use the fine-tuned
    classifier, ask the pre-trained models, check the classifier, serve it, price a bigger run."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    cmds = []
    if classifier is not None:
        cmds.append(f'pretune classify --run {q(classifier)} "a gorgeous, witty film" "two hours I want back"')
    cmds += [f'pretune generate "And God said" --run {q(gpt)} --max-new-tokens 20',
             f'pretune fill-mask "Washington is the [MASK] of the US." --run {q(bert)}']
    if classifier is not None:
        cmds.append(f"pretune evaluate --run {q(classifier)}")
        serve = serve_command([gpt, bert, classifier])
        cmds.append(serve if serve else "# pretune serve --run ... (pending: serving issue)")
    cmds.append(f"pretune cost gpt-mini gpt1 gpt3-175b --tokens {gpt_tokens} --hardware a100 --gpus 1")
    return cmds


def print_next(cmds: list[str]) -> None:
    print("\n== what to try next")
    for c in cmds:
        print(f"  {c}")
