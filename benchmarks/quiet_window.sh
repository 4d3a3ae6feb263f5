#!/bin/sh
# Issue 19's figures on a quiet machine, one command (run from the repository root):
#     sh benchmarks/quiet_window.sh            # about 45-55 minutes on the 2-core machine (estimated)
#     sh benchmarks/quiet_window.sh --quick    # every benchmark, fewer rounds: about 15-20 minutes
# 1. whether int8 decoding at the GPT-2-small shape reaches 3x transformers fp32 at 2 threads, with
#    the lean decoder step against Transformer.forward per token and the int8 products alone (~1 min);
# 2. the matmul peaks at 2 threads (bf16 needs AVX512-BF16 or AMX to be fast; ~10 s);
# 3. the whole `pretune bench` suite at 2 threads (the issue's setting): JSON under
#    benchmarks/results/, and docs/performance.md's table regenerated from it with the date and the
#    machine (GPT-2-small training in fp32 and bf16 with their fraction of the matmul peak in their
#    precision, generation with every --weights and its roofline, gpt-mini bf16 against transformers).
# Each part prints its start and end (UTC), so the window's length is on record.
set -e
PY="${PY:-$PWD/.venv/bin/python}"  # the repository's own environment (make install)
STAMP=$(date -u +%Y%m%d-%H%M)
QUICK=""
[ "$1" = "--quick" ] && QUICK="--quick"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results
uptime
date -u +"int8 cap: %T"
$PY benchmarks/int8_cap.py --threads 2 --new-tokens 32 | tee "benchmarks/results/$STAMP-int8-cap.txt"
date -u +"matmul peak: %T"
$PY benchmarks/matmul_peak.py --threads 2 | tee "benchmarks/results/$STAMP-matmul-peak.txt"
date -u +"pretune bench $QUICK: %T"
$PY -m pretune bench $QUICK --threads 2 --out "benchmarks/results/$STAMP-quiet.json" --docs docs/performance.md
date -u +"done: %T"
uptime
