#!/bin/sh
# Run the SIGTERM-to-torchrun test N times in a row (default 10), alternating the signal's moment:
# rank 0 held between steps (the test's default, PRETUNE_FAULT_PAUSE), and from outside at a
# varying delay after the 3rd logged step (PRETUNE_TEST_SIGTERM_DELAY). Prints passed/total.
#   nice -n 10 sh scripts/stress_sigterm.sh 10
N=${1:-10}
PY=${PY:-python}
pass=0
for i in $(seq 1 "$N"); do
  case $((i % 5)) in
    0) d="";; 1) d=0;; 2) d=0.013;; 3) d="";; 4) d=0.037;;
  esac
  if [ -n "$d" ]; then export PRETUNE_TEST_SIGTERM_DELAY=$d; else unset PRETUNE_TEST_SIGTERM_DELAY; fi
  if $PY -m pytest tests/test_distributed.py -q -x -k sigterm -p no:cacheprovider >/tmp/stress_sigterm.$i.log 2>&1; then
    pass=$((pass + 1)); r=pass
  else
    r="FAIL (log /tmp/stress_sigterm.$i.log)"
  fi
  echo "run $i delay=${d:-between-steps}: $r"
done
echo "passed $pass/$N"
