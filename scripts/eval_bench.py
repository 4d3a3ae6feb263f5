"""pretune's scorer against lm-eval's hf backend (docs/evaluation.md, "Benchmark"): SmolLM2, the
same requests both sides, alternating rounds; one-word answers and multi-token phrases.
Quiet-machine run: PYTHONPATH=src python scripts/eval_bench.py [limit] [rounds] > bench.jsonl"""
import json
import sys

from pretune_bench.evaluation import harness_mc

limit = int(sys.argv[1]) if len(sys.argv) > 1 else 40
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
for phrase in (None, "a {} review"):
    r = harness_mc("smollm2", "movie-sentiment", shots=4, limit=limit, batch_size=8, rounds=rounds, warmup=1,
                   threads=2, phrase=phrase)
    print(json.dumps(r), flush=True)
