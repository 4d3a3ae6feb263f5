"""The demo's fine-tuning recipe as it is now (final weights, one validation at the end) on round one's
pre-trained runs: 3 seeds, 100 / 1,000 labels. usage: python experiments/newrecipe.py NAME RUN OUT VARIANTS"""
import json, sys

import torch

torch.set_num_threads(1)
from pretune.recipes.transfer import run_transfer_experiment

name, run, out, variants = sys.argv[1:5]
res = run_transfer_experiment({name: run}, out, seeds=(0, 1, 2), sizes=(100, 1000), variants=tuple(variants.split(",")),
                              progress=False)
print(json.dumps(res["summary"], indent=1))
