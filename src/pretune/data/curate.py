"""Curating text before tokenization: quality filters, deduplication, decontamination.

The steps, in the order they always run (each sees only what the previous kept):

  quality        Gopher's heuristics (Rae et al. 2021, appendix A.1.1, Table A1): word
                 count, mean word length, symbol-to-word ratio, bullet and ellipsis
                 lines, alphabetic words, stop words, then the repetition filters
                 (duplicate lines and paragraphs, the top 2-4-gram, duplicate 5-10-grams).
                 A document is counted under the first filter it fails.
  exact          exact duplicates: a blake2b digest of the normalised text (NFKC,
                 lowercase, whitespace collapsed); the first copy is kept.
  near           near duplicates: MinHash over word 5-grams (Broder 1997), 128 hash
                 functions in 16 bands x 8 rows (LSH, Indyk & Motwani 1998), as GPT-3
                 (Brown et al. 2020, appendix A) and RefinedWeb (Penedo et al. 2023) do it.
                 A band collision makes a candidate; a candidate is a duplicate when the
                 signatures agree on >= 0.8 of their 128 entries (the estimate of the
                 Jaccard similarity). P(candidate | Jaccard s) = 1 - (1 - s^8)^16:
                 s = 0.5: 0.061, 0.6: 0.23, 0.7: 0.61, 0.8: 0.947, 0.9: 0.9999.
  decontaminate  GPT-3's 13-gram overlap (appendix C): a document that shares a 13-gram
                 of lowercase, punctuation-free words with an evaluation text is dropped
                 ("drop"), or, as GPT-3 did, the colliding n-gram and 200 characters either
                 side are cut out, pieces under 200 characters discarded and a document
                 cut into more than 10 pieces dropped ("cut").

Short evaluation texts: GPT-3 sized its n-gram per benchmark, clamped to [8, 13] words.
Here a text of 13 words or more contributes all its 13-grams; a text of 8 to 12 words
contributes itself whole (its length is the n-gram); a text under 8 words is not
checked (a collision that short is mostly spurious) and is counted as such.

Streaming, constant memory except the dedup index: about 150 bytes per document for
exact, 2 KB per kept document for near (the 512-byte signature, 16 band entries). Hashing is
deterministic (blake2b for words and texts, a seeded numpy generator for the MinHash
functions), never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import PretuneError
from .curate_filters import (DEFAULT_STEPS, QUALITY_FILTERS, STEPS, CurateConfig, Decontaminator, LSHIndex, MinHash,
                             _cut, candidate_probability, normalise, quality_failure, shingles, word_hashes, words)


def eval_texts(specs: Iterable[str], splits: tuple[str, ...] = ("test",)) -> tuple[list[str], list[str]]:
    """(texts, a description of each spec): a built-in task or a labelled .csv/.tsv/.jsonl file
    gives the texts of its test split (as `pretune finetune` splits it); a .txt file gives
    every non-empty line."""
    from .labelled import ALIASES, BUILTIN, load_task

    texts, described = [], []
    for spec in specs:
        spec = str(spec).strip()
        if not spec:
            continue
        p = Path(spec).expanduser()
        if spec not in BUILTIN and spec not in ALIASES and p.suffix.lower() in (".txt", ".text"):
            if not p.is_file():
                raise PretuneError("no such evaluation file", spec, "give a built-in task or an existing file")
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
            texts.extend(ln for ln in lines if ln)
            described.append(f"{spec} ({sum(1 for ln in lines if ln)} lines)")
            continue
        task = load_task(spec)  # unknown names fail here, one line
        n = 0
        for s in splits:
            for e in task.split(s):
                texts.append(e.text)
                n += 1
                if e.text_b:
                    texts.append(e.text_b)
        described.append(f"{task.name} {'+'.join(splits)} ({n} examples)")
    return texts, described


# -- the pipeline -----------------------------------------------------------------------

def parse_steps(steps: Iterable[str] | None, decontaminate: bool) -> tuple[str, ...]:
    """Step names -> the steps to run, in the fixed order. "default" = quality, exact, near;
    "all" adds decontaminate when evaluation sets are named."""
    chosen: set[str] = set()
    for s in steps or ():
        s = str(s).strip().lower()
        if s in ("", "none"):
            continue
        if s == "default":
            chosen.update(DEFAULT_STEPS)
        elif s == "all":
            chosen.update(DEFAULT_STEPS + (("decontaminate",) if decontaminate else ()))
        elif s in STEPS:
            chosen.add(s)
        else:
            raise PretuneError(f"unknown curation step '{s}'", "curation steps",
                               f"choose from {', '.join(STEPS)}, default or all")
    if decontaminate:
        chosen.add("decontaminate")
    elif "decontaminate" in chosen:
        raise PretuneError("the decontaminate step needs evaluation sets", "curation steps",
                           "name them with --decontaminate TASK[,TASK] (built-in tasks or files)")
    return tuple(s for s in STEPS if s in chosen)


@dataclass
class _Count:
    documents: int = 0
    bytes: int = 0

    def add(self, text: str) -> None:
        self.documents += 1
        self.bytes += len(text.encode("utf-8", "surrogatepass"))


class Curator:
    """Runs the chosen steps over a stream of documents, counting what each removes.

    `curator(doc, source)` returns the pieces to keep: [] (removed), [doc], or, for
    decontamination in "cut" mode, the pieces left. The dedup indexes persist across
    calls, so sources curated one after another are deduplicated against each other."""

    def __init__(self, steps: Iterable[str] = DEFAULT_STEPS, config: CurateConfig | dict | None = None,
                 eval_sets: Iterable[str] = ()):
        cfg = config if isinstance(config, CurateConfig) else CurateConfig()
        if isinstance(config, dict):
            names = {f.name for f in fields(CurateConfig)}
            for k, v in config.items():
                if k not in names:
                    raise PretuneError(f"unknown curation setting '{k}'", None, f"choose from {', '.join(names)}")
                setattr(cfg, k, v)
        if cfg.mode not in ("drop", "cut"):
            raise PretuneError(f"unknown decontamination mode '{cfg.mode}'", "--curation.mode", "use drop or cut")
        if not 0.0 < cfg.threshold <= 1.0:
            raise PretuneError(f"the near-duplicate threshold must lie in (0, 1], got {cfg.threshold}",
                               "--curation.threshold", "use e.g. 0.8")
        eval_sets = [e for e in eval_sets if str(e).strip()]
        self.steps = parse_steps(steps, bool(eval_sets))
        if not self.steps:
            raise PretuneError("no curation step chosen", "curation steps", f"choose from {', '.join(STEPS)}")
        self.cfg = cfg
        self.minhash = MinHash(cfg.num_perm, cfg.seed) if "near" in self.steps else None
        self.lsh = LSHIndex(cfg.num_perm, cfg.bands, cfg.threshold) if "near" in self.steps else None
        self.exact: set[bytes] = set()
        self.decon, self.eval_described = None, []
        if "decontaminate" in self.steps:
            texts, self.eval_described = eval_texts(eval_sets)
            self.decon = Decontaminator(texts, cfg.ngram, cfg.min_eval_words)
        self.input, self.kept = _Count(), _Count()
        self.removed = {s: _Count() for s in self.steps}
        self.filters = {f: 0 for f in QUALITY_FILTERS}
        self.cut = {"documents": 0, "pieces": 0, "bytes_removed": 0}
        self.seconds = {s: 0.0 for s in ("words", *self.steps)}
        self.per_source: dict[str, dict] = {}

    def __call__(self, doc: str, source: str = "") -> list[str]:
        src = self.per_source.setdefault(source, {"documents": 0, "kept": 0,
                                                  "removed": {s: 0 for s in self.steps}})
        src["documents"] += 1
        self.input.add(doc)
        t = time.perf_counter()
        ws = words(doc)
        h = word_hashes(ws)
        now = time.perf_counter()
        self.seconds["words"] += now - t
        out = [doc]
        for step in self.steps:
            t, gone = now, False
            if step == "quality":
                why = quality_failure(doc, ws, self.cfg, h)
                if why is not None:
                    self.filters[why] += 1
                    gone = True
            elif step == "exact":
                key = hashlib.blake2b(normalise(doc).encode("utf-8", "surrogatepass"), digest_size=16).digest()
                gone = key in self.exact
                self.exact.add(key)
            elif step == "near":
                sig = self.minhash.signature(shingles(h, self.cfg.shingle))
                gone = self.lsh.add(sig)[0] >= 0
            elif step == "decontaminate":
                hits = self.decon.collisions(h)
                if hits:
                    pieces = _cut(doc, hits, self.cfg) if self.cfg.mode == "cut" else None
                    if pieces:
                        self.cut["documents"] += 1
                        self.cut["pieces"] += len(pieces)
                        self.cut["bytes_removed"] += len(doc.encode("utf-8", "surrogatepass")) - sum(
                            len(p.encode("utf-8", "surrogatepass")) for p in pieces)
                        out = pieces
                    else:
                        gone = True
            now = time.perf_counter()
            self.seconds[step] += now - t
            if gone:
                self.removed[step].add(doc)
                src["removed"][step] += 1
                return []
        src["kept"] += 1
        for p in out:
            self.kept.add(p)
        return out

    def wrap(self, name: str, documents: Callable[[], Iterator[str]]) -> Callable[[], Iterator[str]]:
        """A source's documents, curated. The first full pass decides; later passes (a source
        weighted above one epoch is read again) replay the decisions, so a deliberate
        repetition is not taken for duplication and counts are per distinct document."""
        decisions: list[list[str] | None] | None = None

        def curated() -> Iterator[str]:
            nonlocal decisions
            if decisions is not None:
                for doc, keep in zip(documents(), decisions):
                    yield from (keep if keep is not None else [doc])
                return
            made: list[list[str] | None] = []
            for doc in documents():
                out = self(doc, name)
                made.append(None if out == [doc] else out)  # None: kept unchanged (no copy held)
                yield from out
            decisions = made

        return curated

    def report(self) -> dict:
        """What went in, what each step removed, what came out: for meta.json and the CLI."""
        cfg = self.cfg
        removed = {s: asdict(c) for s, c in self.removed.items()}
        if "quality" in removed:
            removed["quality"]["filters"] = {k: v for k, v in self.filters.items() if v}
        if "near" in removed:
            removed["near"].update(rule=f"MinHash word {cfg.shingle}-grams, {cfg.num_perm} functions, "
                                        f"{cfg.bands} bands x {cfg.num_perm // cfg.bands} rows, "
                                        f"estimated Jaccard >= {cfg.threshold}",
                                   seed=cfg.seed)
        if "decontaminate" in removed:
            d = self.decon
            removed["decontaminate"].update(
                rule=f"{cfg.ngram}-gram overlap (whole text for {cfg.min_eval_words}-{cfg.ngram - 1} words), "
                     f"mode {cfg.mode}", eval_sets=self.eval_described, eval_texts=d.texts,
                eval_texts_too_short=d.too_short, eval_ngrams=len(d))
            if cfg.mode == "cut":
                removed["decontaminate"]["cut"] = dict(self.cut)
        return {"steps": list(self.steps), "input": asdict(self.input), "removed": removed,
                "kept": asdict(self.kept), "sources": self.per_source,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "config": {k: v for k, v in asdict(cfg).items()}}


def format_report(rep: dict) -> str:
    """The report as a small table: one line per step."""
    inp = rep["input"]
    lines = [f"{'step':<14} {'documents':>10} {'bytes':>13} {'% bytes':>8} {'seconds':>8}",
             f"{'input':<14} {inp['documents']:>10,} {inp['bytes']:>13,} {100.0:>8.2f} "
             f"{rep['seconds'].get('words', 0):>8.1f}"]
    for s, r in rep["removed"].items():
        lines.append(f"{'- ' + s:<14} {r['documents']:>10,} {r['bytes']:>13,} "
                     f"{100 * r['bytes'] / max(1, inp['bytes']):>8.2f} {rep['seconds'].get(s, 0):>8.1f}")
        if s == "quality" and r.get("filters"):
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in sorted(r["filters"].items(), key=lambda kv: -kv[1])))
    k = rep["kept"]
    lines.append(f"{'kept':<14} {k['documents']:>10,} {k['bytes']:>13,} "
                 f"{100 * k['bytes'] / max(1, inp['bytes']):>8.2f}")
    return "\n".join(lines)


def curate_cmd(corpus: list[str], out: Path | None = None, steps: list[str] | None = None,
               decontaminate: list[str] | None = None, curation: CurateConfig = None,
               progress: bool = True) -> dict:
    """Curate text (quality filters, exact and near dedup, eval-set decontamination) into a JSONL file.

    Args:
        corpus: built-in sources (builtin = movies, wikipedia, bible; austen only when named), UTF-8
            .txt/.jsonl files or folders; each document is read once
        out: the JSONL file to write ({"text", "source"} per kept document; a .report.json beside it)
        steps: comma-separated steps among quality, exact, near, decontaminate (default: quality,exact,near)
        decontaminate: evaluation sets whose texts must not leak: built-in tasks (their test split),
            labelled .csv/.jsonl files (their test split) or .txt files (every line)
        curation: thresholds (see curate.CurateConfig), e.g. --curation.threshold 0.7
        progress: show a progress bar
    """
    from tqdm.auto import tqdm

    from ..fileio import atomic_file, check_creatable, make_dir
    from .corpora import resolve_corpus

    if out is None:
        raise PretuneError("no output file given", "pretune curate", "add --out FILE.jsonl")
    out = Path(out)
    if out.is_dir():
        raise PretuneError("the output is a folder", str(out), "give a file name, e.g. curated.jsonl")
    check_creatable(out, "the curated file", folder=False)
    cur = Curator(steps or DEFAULT_STEPS, curation or None, decontaminate or ())
    parts = resolve_corpus(list(corpus or ["builtin"]))
    make_dir(out.parent, "the curated file")
    with atomic_file(out, "w") as f:
        bar = tqdm(total=sum(q.approx_bytes for q in parts), unit="B", unit_scale=True,
                   disable=not progress, desc="curating", dynamic_ncols=True)
        for q in parts:
            for doc in q.documents():
                for piece in cur(doc, q.name):
                    f.write(json.dumps({"text": piece, "source": q.name}, ensure_ascii=False) + "\n")
                bar.update(len(doc.encode("utf-8", "surrogatepass")))
        bar.close()
    rep = cur.report()
    from ..fileio import atomic_write_json
    atomic_write_json(out.with_suffix(".report.json"), rep)
    print(format_report(rep))
    print(f"{out}: {rep['kept']['documents']:,} documents kept of {rep['input']['documents']:,}", file=sys.stderr)
    return rep


def measure_near(pairs: int = 1200, words_per_doc: int = 300, seed: int = 0) -> list[tuple[float, int, float]]:
    """The near step's measured S-curve: pairs of made-up documents with 1 to 40 words replaced,
    grouped by their exact Jaccard (set arithmetic on word 5-grams, rounded to 0.05):
    [(Jaccard, pairs, share removed as near duplicates)]."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("bcdfghjklmnprstvwz"))
    pool = list(dict.fromkeys("".join(rng.choice(letters, 6)) for _ in range(40_000)))

    def grams(ws):
        return {tuple(ws[i:i + 5]) for i in range(len(ws) - 4)}

    bins: dict[float, list[bool]] = {}
    for _ in range(pairs):
        base = [pool[i] for i in rng.choice(len(pool), words_per_doc, replace=False)]
        other = list(base)
        for i in rng.choice(words_per_doc, int(rng.integers(1, 40)), replace=False):
            other[i] = "q" + pool[int(rng.integers(len(pool)))]
        a, b = grams(base), grams(other)
        cur = Curator(["near"])
        cur(" ".join(base))
        bins.setdefault(round(len(a & b) / len(a | b) * 20) / 20, []).append(cur(" ".join(other)) == [])
    return [(s, len(v), float(np.mean(v))) for s, v in sorted(bins.items())]


if __name__ == "__main__":
    print("| exact Jaccard | pairs | removed as near duplicates | LSH P(candidate) |\n| --- | --- | --- | --- |")
    for s, n, share in measure_near():
        if n >= 10:
            print(f"| {s:.2f} | {n} | {share:.2f} | {candidate_probability(s):.3f} |")
