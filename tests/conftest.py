import os

import pytest
import torch

os.environ.setdefault("PRETUNE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache-test"))
torch.set_num_threads(1)  # tiny test models: one thread is faster and never oversubscribed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
