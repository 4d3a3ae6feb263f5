#!/bin/sh
# Issue 20's budget check, for a quiet machine: a fresh clone, the set-up, then `time make demo`
# (target <= 15 min on 2 cores). The demo's last lines give the table (paste it into README.md
# between the demo-table markers, with the date, machine, commit and time) and its time per phase.
# usage: sh experiments/time_demo.sh [REPO (default: this one)] [DIR (default: /tmp/pretune-demo-fresh)]
set -e
REPO=${1:-$(git rev-parse --show-toplevel)}
DIR=${2:-/tmp/pretune-demo-fresh}
rm -rf "$DIR"
git clone -q "$REPO" "$DIR"
cd "$DIR"
make .venv/.installed
echo "commit $(git rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -sm)"
( time make demo ) > demo.log 2>&1
grep -A 16 "^== the table" demo.log
grep "demo finished\|time per phase" demo.log
tail -3 demo.log
