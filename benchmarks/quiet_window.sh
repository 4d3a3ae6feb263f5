#!/bin/sh
# Issue 19's figures on a quiet machine, one command (run from the repository root):
#     sh benchmarks/quiet_window.sh            # about 35-45 minutes on the 2-core machine (estimated)
# 1. the whole `pretune bench` suite at 2 threads (the issue's setting): JSON under
#    benchmarks/results/, and docs/performance.md's table regenerated from it with the date and the
#    machine (GPT-2-small training in fp32 and bf16 with their fraction of the matmul peak in their
#    precision, generation with every --weights and its roofline, gpt-mini bf16 against transformers);
# 2. whether the int8 kernel itself caps GPT-2-small decoding below 3x, at 2 threads;
# 3. the matmul peaks at 2 threads (bf16 needs AVX512-BF16 or AMX to be fast).
set -e
PY="${PY:-/work/main/.venv/bin/python}"
STAMP=$(date -u +%Y%m%d-%H%M)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results
uptime
$PY benchmarks/matmul_peak.py --threads 2 | tee "benchmarks/results/$STAMP-matmul-peak.txt"
$PY benchmarks/int8_cap.py --threads 2 --new-tokens 32 | tee "benchmarks/results/$STAMP-int8-cap.txt"
$PY -m pretune bench --threads 2 --out "benchmarks/results/$STAMP-quiet.json" --docs docs/performance.md
uptime
