"""The bar a pre-trained model must clear: bag-of-words logistic regression, measured.

A review becomes the set of its words and word pairs (binary unigram + bigram features,
vocabulary from the labelled examples alone), and a multinomial logistic regression with an
L2 penalty reads them: sklearn's objective (C * sum of cross-entropies + 1/2 ||W||^2, the
bias unpenalised), minimised by full-batch L-BFGS in float64 so it is deterministic.
Bigrams because on movie-review sentences they are worth a point or two over unigrams (Wang &
Manning 2012, "Baselines and Bigrams", table 3: MNB uni 77.9 vs bi 79.0 on RT-s). C is
chosen on the same fixed 200-example validation subset the fine-tuned cells use, the test is
the whole test split: the comparison with the neural rows is like for like.
Written with torch (no scikit-learn at run time); tests/test_recipes.py checks it against
scikit-learn's LogisticRegression on the same features.
"""

from __future__ import annotations

import re
import time
import warnings

import torch

from ..data.labelled import Example, Task, load_task, subsample

C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # inverse penalty strengths tried on validation

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


def words(text: str) -> list[str]:
    """Lower-case word tokens; '!' and '?' kept (they carry sentiment), other punctuation dropped."""
    return _WORD.findall(text.lower())


def ngrams(text: str, bigrams: bool = True) -> set[str]:
    w = words(text)
    return set(w) | ({f"{a} {b}" for a, b in zip(w, w[1:])} if bigrams else set())


def _text(e: Example) -> str:
    return e.text if e.text_b is None else f"{e.text} {e.text_b}"


class BagOfWords:
    """Binary n-gram features over a vocabulary built from the training texts (sorted: stable)."""

    def __init__(self, texts: list[str], bigrams: bool = True):
        self.bigrams = bigrams
        self.vocab = {g: i for i, g in enumerate(sorted(set().union(*(ngrams(t, bigrams) for t in texts))))}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """A sparse (CSR) float64 matrix, one row per text: a review has a few dozen n-grams
        of tens of thousands, so the matrix products of L-BFGS cost microseconds."""
        crow, cols = [0], []
        for t in texts:
            cols += sorted(self.vocab[g] for g in ngrams(t, self.bigrams) if g in self.vocab)
            crow.append(len(cols))
        with warnings.catch_warnings():  # torch's notes that CSR support is "beta": nothing to act on
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(cols, dtype=torch.int64),
                                           torch.ones(len(cols), dtype=torch.float64),
                                           (len(texts), len(self.vocab)), check_invariants=False)


def fit_logreg(x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0,
               max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising C * sum_i CE(x_i W + b, y_i) + 1/2 ||W||^2 (sklearn's multinomial
    objective, bias unpenalised), by L-BFGS with a strong-Wolfe line search."""
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = C * torch.nn.functional.cross_entropy(x @ W + b, y, reduction="sum") + 0.5 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def _accuracy(W, b, x, y) -> float:
    return float(((x @ W + b).argmax(1) == y).double().mean())


def bow_baseline(task: str | Task = "movie-sentiment", train_examples: int | None = 1000, seed: int = 0,
                 eval_examples: int = 200, grid=C_GRID, bigrams: bool = True) -> dict:
    """Train the baseline on `train_examples` labelled examples (the stratified subset the
    fine-tuned cells of this seed see), pick C on the validation subset, test on the test split."""
    t0 = time.time()
    t = task if isinstance(task, Task) else load_task(task)
    k = len(t.labels)
    train = t.train if train_examples is None else subsample(t.train, train_examples, k, seed)
    val = subsample(t.val, eval_examples, k, 0) if eval_examples else t.val
    feats = BagOfWords([_text(e) for e in train], bigrams)

    def xy(ex):
        return feats([_text(e) for e in ex]), torch.tensor([e.label for e in ex])

    (xt, yt), (xv, yv), (xs, ys) = xy(train), xy(val), xy(t.test)
    best = None
    for C in grid:  # the first C of the best validation accuracy (the strongest penalty on a tie)
        W, b = fit_logreg(xt, yt, k, C)
        acc = _accuracy(W, b, xv, yv)
        if best is None or acc > best[0]:
            best = (acc, C, W, b)
    acc_v, C, W, b = best
    pred = (xs @ W + b).argmax(1)
    from ..evaluation.classification import classification_metrics

    m = classification_metrics(ys.tolist(), pred.tolist(), k)
    return {"train_examples": len(train), "C": C, "val_accuracy": acc_v, "features": len(feats.vocab),
            "test": m, "seconds": time.time() - t0}
