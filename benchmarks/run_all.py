"""The whole suite, as `pretune bench` runs it; results to benchmarks/results/<date>.json.

    python benchmarks/run_all.py            # ~25 min on 2 shared cores (GPT-2-small shape included)
    python benchmarks/run_all.py --quick    # the mini shapes only, a few minutes
"""

import time
from pathlib import Path

from _common import parser, report

if __name__ == "__main__":
    ap = parser(__doc__.split("\n")[0], rounds=0)
    ap.add_argument("--quick", action="store_true", help="leave out the GPT-2-small shape")
    ap.add_argument("--only", default=None, help="comma-separated label fragments, e.g. 'gpt_train mini,generate'")
    a = ap.parse_args()
    from pretune_bench import suite

    res = suite.run_suite(only=a.only.split(",") if a.only else None, quick=a.quick, rounds=a.rounds or None,
                          threads=a.threads)
    path = a.json or str(Path(__file__).parent / "results" / time.strftime("%Y%m%d-%H%M%S.json"))
    report(res, path)
