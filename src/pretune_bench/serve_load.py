"""Load on `pretune serve`, over loopback (a uvicorn server in this process, real sockets):

1. `load`: N concurrent requests (200 by default, a bounded count, mixed over the endpoints:
   fill-mask, short generations, classify-free similarity, the cost planner, the run list,
   metrics), every one must succeed; p50 / p99 latency.
2. `batching`: 16 concurrent generation requests (32-token prompts, 64 new tokens) served by a
   server that batches them (`--max-batch 16`) against one that serves them one at a time
   (`--max-batch 1`), alternating rounds (A B, B A, ...) as harness.py does; generated tokens
   per second of each, and their ratio (the issue's target: >= 3x), for gpt-mini and the
   GPT-2-small shape (random weights: speed does not depend on them).

    python -m pretune_bench.serve_load [--shapes mini gpt2] [--rounds 3] [--requests 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

TEXT = " ".join(f"Washington is the capital of the United States and Paris is the capital of France, "
                f"said document number {i} of the corpus." for i in range(40))
TARGET = 3.0  # batched / one at a time, generated tokens per second (the issue)


def make_run(path: Path, preset_name: str, tokenizer=None, **over) -> Path:
    """A run directory as `pretune pretrain` leaves one, with random weights (seed 0)."""
    from pretune.config.presets import preset
    from pretune.fileio import atomic_write_json
    from pretune.models.transformer import Transformer
    from pretune.runs import checkpoint as ckpt
    from pretune.tokenizer.vocabularies import train_tokenizer

    torch.manual_seed(0)
    cfg = preset(preset_name, dropout=0.0, **over)
    kind = "bpe" if cfg.causal else "wordpiece"
    tok = tokenizer or train_tokenizer(kind, min(cfg.vocab_size, 2000), TEXT.split(", "))
    path.mkdir(parents=True)
    atomic_write_json(path / "config.json", {"model": cfg.to_dict()})
    tok.save(path)
    ckpt.save_checkpoint(path, 0, Transformer(cfg))
    return path


class Server:
    """uvicorn on 127.0.0.1, a free port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.srv.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.srv.started:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.srv.should_exit = True
        self.thread.join(timeout=30)


def _prompt(tok, n: int) -> str:
    """A text of exactly n tokens (n <= the text's length)."""
    words = TEXT.split()
    for k in range(1, len(words) + 1):
        s = " ".join(words[:k])
        if len(tok.encode(s)) >= n:
            ids = tok.encode(s)[:n]
            s = tok.decode(ids)
            if len(tok.encode(s)) == n:
                return s
    raise RuntimeError("no prompt of that length")


async def _fire(url: str, bodies: list[tuple[str, str, dict | None]], limit: int) -> list[tuple[float, int, dict]]:
    """Send every (method, path, body) at once (at most `limit` connections); (seconds, status, json) each."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=limit,
                                                                                 max_keepalive_connections=limit)) as c:
        async def one(method, path, body):
            t0 = time.perf_counter()
            r = await (c.get(path) if method == "get" else c.post(path, json=body))
            return time.perf_counter() - t0, r.status_code, r.json()
        return await asyncio.gather(*(one(*b) for b in bodies))


def load(n: int = 200, workdir: Path | None = None) -> dict:
    """n concurrent mixed requests against a tiny GPT and a tiny BERT; p50 / p99 latency."""
    from pretune.serve.api import create_app
    from pretune.serve.runs import load_runs

    with tempfile.TemporaryDirectory(dir=workdir) as d:
        tiny = dict(n_layer=2, d_model=64, n_head=2, max_seq_len=128)
        runs = load_runs([make_run(Path(d) / "gpt", "gpt-mini", vocab_size=512, **tiny),
                          make_run(Path(d) / "bert", "bert-mini", vocab_size=512, **tiny)])
        kinds = [("post", "/api/fill-mask", {"run": "bert", "text": "Paris is the [MASK] of France."}),
                 ("post", "/api/generate", {"run": "gpt", "prompt": "Paris is", "max_new_tokens": 16}),
                 ("post", "/api/similarity", {"run": "bert", "a": "Paris", "b": "France"}),
                 ("post", "/api/cost", {"models": ["gpt1", "gpt3-175b", "gpt4-moe"]}),
                 ("get", "/api/runs", None),
                 ("get", "/api/runs/gpt/metrics", None)]
        bodies = [kinds[i % len(kinds)] for i in range(n)]
        app = create_app(runs, max_batch=16)
        with Server(app) as url:
            asyncio.run(_fire(url, kinds, 8))  # warm-up
            t0 = time.perf_counter()
            res = asyncio.run(_fire(url, bodies, n))
            wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in res)
    errors = [r for r in res if r[1] != 200]
    q = statistics.quantiles(lat, n=100)
    return {"requests": n, "errors": len(errors), "wall_s": wall, "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * q[98], "max_ms": 1e3 * lat[-1],
            "first_error": errors[0][2] if errors else None}


SHAPES = {"mini": dict(preset="gpt-mini"), "gpt2": dict(preset="gpt2"),
          "tiny": dict(preset="gpt-mini", n_layer=2, d_model=64, n_head=2, vocab_size=512)}


def batching(shape: str = "mini", concurrent: int = 16, prompt_tokens: int = 32, new_tokens: int = 64,
             rounds: int = 3, device: str = "cpu", workdir: Path | None = None) -> dict:
    """Generated tokens/s of `concurrent` simultaneous requests: batched on the server vs one at a time."""
    from pretune.serve.api import create_app
    from pretune.serve.runs import load_runs

    s = dict(SHAPES[shape])
    name = s.pop("preset")
    tok = None
    if name == "gpt2" or s.get("vocab_size", 0) >= 50257:
        from pretune.data.tokenizers import gpt2_tokenizer
        tok = gpt2_tokenizer()
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        path = make_run(Path(d) / shape, name, tok, **s)
        runs = load_runs([path])
        r = next(iter(runs.values()))
        if device != "cpu":
            r.model.to(device)
        prompt = _prompt(r.tok, prompt_tokens)
        bodies = [("post", "/api/generate", {"run": r.name, "prompt": prompt, "max_new_tokens": new_tokens,
                                             "seed": i}) for i in range(concurrent)]
        apps = {"batched": create_app(runs, max_batch=concurrent), "one at a time": create_app(runs, max_batch=1)}
        times = {k: [] for k in apps}
        toks = {k: [] for k in apps}
        with Server(apps["batched"]) as u1, Server(apps["one at a time"]) as u2:
            urls = {"batched": u1, "one at a time": u2}
            for k in apps:  # warm-up
                asyncio.run(_fire(urls[k], bodies[:2], 2))
            for i in range(rounds):
                order = list(apps) if i % 2 == 0 else list(apps)[::-1]
                for k in order:
                    t0 = time.perf_counter()
                    res = asyncio.run(_fire(urls[k], bodies, concurrent))
                    times[k].append(time.perf_counter() - t0)
                    assert all(x[1] == 200 for x in res), [x[2] for x in res if x[1] != 200][:1]
                    toks[k].append(sum(x[2]["tokens"] for x in res))
            sizes = apps["batched"].state.batchers[r.name].sizes
    rate = {k: statistics.median(t / s for t, s in zip(toks[k], times[k])) for k in apps}
    return {"shape": shape, "params": sum(p.numel() for p in r.model.parameters()), "device": device,
            "concurrent": concurrent, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds,
            "tokens_per_s": rate, "ratio": rate["batched"] / rate["one at a time"], "target": TARGET,
            "batch_sizes": sorted(set(sizes))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m pretune_bench.serve_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["mini", "gpt2"], choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"threads": torch.get_num_threads(), "load": load(a.requests)}
    L = out["load"]
    print(f"load: {L['requests']} concurrent requests, {L['errors']} errors, p50 {L['p50_ms']:.0f} ms, "
          f"p99 {L['p99_ms']:.0f} ms, wall {L['wall_s']:.1f} s", flush=True)
    out["batching"] = []
    for sh in a.shapes:
        b = batching(sh, rounds=a.rounds, device=a.device)
        out["batching"].append(b)
        t = b["tokens_per_s"]
        print(f"batching {sh} ({b['params'] / 1e6:.1f}M, {b['device']}): {b['concurrent']} concurrent x "
              f"{b['new_tokens']} new tokens: batched {t['batched']:.0f} tok/s, one at a time "
              f"{t['one at a time']:.0f} tok/s: {b['ratio']:.2f}x (target >= {TARGET:g}x) "
              f"{'ok' if b['ratio'] >= TARGET else 'BELOW TARGET'}; batch sizes {b['batch_sizes']}", flush=True)
    if a.json:
        print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
