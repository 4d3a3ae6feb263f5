"""Transfer from real weights (issue 4, item 6) is a `pretune demo --full` step; its runs are
far too slow for the suite, so here only its wiring: which runs, and a missing package skipped."""

from pretune import transfer


def test_real_runs_are_the_documented_ones():
    # docs/interop.md, "Transfer from real weights": MiniLM L2; SmolLM2 L2 and L3 (lambda 0.5),
    # 500 labels with the embeddings and the lowest 24 of 30 blocks frozen; MiniLM 2 epochs (85.9%).
    got = [(m, obj, n, fr, lr, ep) for m, _, _, _, obj, n, fr, lr, ep in transfer.REAL_RUNS]
    assert got == [("all-MiniLM-L6-v2", "L2", None, None, 1e-4, 2.0), ("SmolLM2-135M", "L2", 500, "24", 3e-4, 1.0),
                   ("SmolLM2-135M", "L3", 500, "24", 3e-4, 1.0)]
    assert transfer.REAL_RECIPE["max_len"] == 64


def test_missing_package_is_skipped_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transfer, "REAL_RUNS",
                        [("nope", "pretune_no_such_package_xyz", "model", "hf", "L2", 10, None, 1e-4, 1.0)])
    assert transfer.run_real_weights(tmp_path / "real") == []
    assert "skipping nope L2: install pretune_no_such_package_xyz" in capsys.readouterr().out
    assert not (tmp_path / "real").exists()  # nothing half-made
