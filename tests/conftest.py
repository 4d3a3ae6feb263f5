import os

import pytest
import torch

os.environ.setdefault("PRETUNE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache-test"))
os.environ.pop("PRETUNE_HIDE_SOURCES", None)  # the tests choose which sources count as installed
torch.set_num_threads(1)  # tiny test models: one thread is faster and never oversubscribed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


AUSTEN_STATES = ("austen-present", "austen-hidden")


def _austen_state(state: str, monkeypatch) -> str:
    """Put the opt-in source 'austen' in `state`, so that no machine state decides a test:
    hidden: PRETUNE_HIDE_SOURCES=austen, as on a machine without the Debian package;
    present: the real Jane Austen files, read. Where they are absent the present case skips,
    except under CI=true (the set-up there installs them, so absence is a failure)."""
    from pretune.data import corpora as C, sources
    if state == "austen-hidden":
        monkeypatch.setenv(C.HIDE_ENV, "austen")
        return state
    monkeypatch.delenv(C.HIDE_ENV, raising=False)
    if not sources.austen_available():
        why = (f"Jane Austen's novels are not installed ({sources.AUSTEN_RDB} or the rdata parser missing): "
               "apt-get install r-cran-janeaustenr (make test does it as root)")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return state


@pytest.fixture(params=AUSTEN_STATES)
def austen(request, monkeypatch):
    """Run a test twice: with the optional source 'austen' present and hidden."""
    return _austen_state(request.param, monkeypatch)


@pytest.fixture
def austen_state(request, monkeypatch):
    """The same, for indirect parametrization (`austen_state` None: leave the machine as it is)."""
    state = getattr(request, "param", None)
    return None if state is None else _austen_state(state, monkeypatch)
