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


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory):
    """Tiny runs for `pretune serve` (tests/test_serve.py, tests/test_browser.py), trained here
    through the command line: a GPT, a BERT (MLM head) and a classifier fine-tuned from the GPT."""
    from pretune.cli import main
    from pretune.tokenizer.vocabularies import train_tokenizer

    text = "\n\n".join(f"Document {i}. Washington is the capital of the US, and Paris is the capital of France. "
                       f"The quick brown fox jumps over the lazy dog {i % 7} times." for i in range(60))
    d = tmp_path_factory.mktemp("serve")
    (d / "corpus.txt").write_text(text)
    tiny = ["--model.n-layer", "1", "--model.d-model", "32", "--model.n-head", "2", "--model.max-seq-len", "64",
            "--model.vocab-size", "320"]
    train = ["--train.steps", "4", "--train.batch-size", "2", "--train.seq-len", "32", "--train.eval-batches", "1",
             "--train.log-every", "1", "--train.device", "cpu"]
    for kind in ("bpe", "wordpiece"):
        train_tokenizer(kind, 320, text.split("\n\n")).save(d / f"{kind}.json")
        assert main(["prepare", "--corpus", str(d / "corpus.txt"), "--tokenizer", str(d / f"{kind}.json"),
                     "--out", str(d / f"data-{kind}"), "--val-fraction", "0.2"]) == 0
    assert main(["pretrain", "--model", "gpt-mini", "--data", str(d / "data-bpe"), "--out", str(d / "gpt"),
                 *tiny, *train]) == 0
    assert main(["pretrain", "--model", "bert-mini", "--data", str(d / "data-wordpiece"), "--out", str(d / "bert"),
                 *tiny, *train]) == 0
    rows = [f"the film was {'good' if i % 2 else 'bad'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(60)]
    (d / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    assert main(["finetune", "--init", str(d / "gpt"), "--task", str(d / "task.csv"), "--finetune.epochs", "1",
                 "--train.batch-size", "16", "--out", str(d / "ft")]) == 0
    return {"gpt": d / "gpt", "bert": d / "bert", "ft": d / "ft"}
