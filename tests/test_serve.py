"""`pretune serve`'s JSON API against the command line: for the same inputs, each endpoint gives
what the verb prints (fill-mask, generate, classify, embed, cost), generation streamed as
server-sent events and batched across concurrent requests (each row as it would be alone), the
run's metrics up to the last complete line, and hostile input answered 4xx with one message."""

import asyncio
import json
import math

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from pretune.cli import main  # noqa: E402
from pretune.serve.api import MAX_BODY, create_app  # noqa: E402
from pretune.serve.runs import load_runs  # noqa: E402


@pytest.fixture(scope="module")
def loaded(serve_runs):
    return load_runs([serve_runs["gpt"], serve_runs["bert"], serve_runs["ft"]])


@pytest.fixture(scope="module")
def client(loaded):
    app = create_app(loaded, max_batch=16, gather_s=0.3)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app_state = app.state
        yield c


def _cli_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_runs_listed_with_their_capabilities(client):
    d = client.get("/api/runs").json()
    kinds = {r["name"]: (r["kind"], r["capabilities"]) for r in d["runs"]}
    assert kinds == {"gpt": ("decoder", ["generate", "similarity", "metrics"]),
                     "bert": ("encoder", ["fill-mask", "similarity", "metrics"]),
                     "ft": ("classifier", ["classify", "metrics"])}
    assert d["cost_presets"] == ["gpt1", "gpt2-xl", "gpt3-175b", "gpt4-moe"]


def test_fill_mask_as_the_command_line(client, serve_runs, capsys):
    text = "Washington is the [MASK] of the [MASK]."
    want = json.loads(_cli_json(capsys, ["fill-mask", text, "--run", str(serve_runs["bert"]), "--top-k", "5",
                                         "--json-out"]))
    got = client.post("/api/fill-mask", json={"run": "bert", "text": text, "top_k": 5}).json()
    assert [[[c["token"], c["probability"]] for c in m] for m in got["masks"]] == want
    assert len(want) == 2 and all(len(m) == 5 for m in want)


@pytest.mark.parametrize("opts", [{}, {"temperature": 0.0}, {"temperature": 1.3, "top_k": 0, "top_p": 0.9, "seed": 7}])
def test_generate_and_its_stream_as_the_command_line(client, serve_runs, capsys, opts):
    prompt = "The quick brown fox"
    cli = ["generate", prompt, "--run", str(serve_runs["gpt"]), "--max-new-tokens", "20"]
    for k, v in opts.items():
        cli += ["--" + k.replace("_", "-"), str(v)]
    capsys.readouterr()
    from pretune.cli.parser import call_verb
    want = call_verb("generate", cli[1:])[0]  # the verb's own return: the continuation
    body = {"run": "gpt", "prompt": prompt, "max_new_tokens": 20, **opts}
    got = client.post("/api/generate", json=body).json()
    assert got["text"] == want
    with client.stream("POST", "/api/generate/stream", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [b for b in raw.split("\n\n") if b.strip()]
    tokens = [json.loads(e.split("data: ", 1)[1]) for e in events if e.startswith("event: token")]
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert events[-1].startswith("event: done") and len(tokens) > 1
    assert "".join(t["text"] for t in tokens) == done["text"] == want
    assert done["tokens"] == got["tokens"] == len(tokens) or done["tokens"] >= len(tokens)


def test_concurrent_generations_are_batched_each_as_alone(client, serve_runs, loaded):
    """Four requests at once, prompts of different lengths and options: the server decodes them
    as one batch, and each gets what `generate` gives it alone."""
    from pretune.inference.generate import generate
    r = loaded["gpt"]
    bodies = [{"run": "gpt", "prompt": p, "max_new_tokens": n, "temperature": t, "seed": s}
              for p, n, t, s in [("Paris", 12, 0.0, 1), ("The quick brown fox jumps over", 30, 0.8, 2),
                                 ("Document 3.", 5, 1.0, 3), ("Washington is the capital of the", 18, 0.8, 4)]]
    batcher = client.app_state.batchers["gpt"]
    before = len(batcher.sizes)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/api/generate", json=b) for b in bodies))
    outs = [x.json() for x in asyncio.run(go())]
    assert max(batcher.sizes[before:]) >= 2, batcher.sizes[before:]
    for b, o in zip(bodies, outs):
        ids = r.tok.encode(b["prompt"])
        y = generate(r.model, torch.tensor([ids]), b["max_new_tokens"], b["temperature"], 50, 1.0,
                     eos_id=r.tok.eos_id, seed=b["seed"])
        assert o["text"] == r.tok.decode(y[0, len(ids):].tolist()), b


def test_classify_as_the_command_line(client, serve_runs, capsys):
    texts = ["the film was good number 3", "the film was bad number 4"]
    out = _cli_json(capsys, ["classify", *texts, "--run", str(serve_runs["ft"]), "--json-out"])
    want = [json.loads(l) for l in out.splitlines()]
    assert client.post("/api/classify", json={"run": "ft", "texts": texts}).json()["results"] == want


def test_similarity_is_the_cosine_of_the_embed_vectors(client, serve_runs, capsys):
    a, b = "the capital of France", "Paris is a city"
    for run in ("bert", "gpt"):
        e = torch.tensor(json.loads(_cli_json(capsys, ["embed", a, b, "--run", str(serve_runs[run])])))
        want = float(e[0] @ e[1] / (e[0].norm() * e[1].norm()))
        got = client.post("/api/similarity", json={"run": run, "a": a, "b": b}).json()
        assert got["similarity"] == pytest.approx(want, abs=1e-6)


def test_cost_as_the_command_line(client, capsys):
    models = ["gpt1", "gpt2-xl", "gpt3-175b", "gpt4-moe"]
    want = json.loads(_cli_json(capsys, ["cost", *models, "--tokens", "3e11", "--hardware", "h100", "--gpus", "512",
                                         "--mfu", "0.45", "--price", "2.5", "--json"]))
    got = client.post("/api/cost", json={"models": models, "tokens": 3e11, "hardware": "h100", "gpus": 512,
                                         "mfu": 0.45, "price": 2.5}).json()
    assert got == want


def test_cost_of_a_loaded_run_by_name(client, serve_runs, capsys):
    want = json.loads(_cli_json(capsys, ["cost", str(serve_runs["gpt"]), "--json"]))["plans"][0]
    got = client.post("/api/cost", json={"models": ["gpt"]}).json()["plans"][0]
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in want.items() if k != "model"}


def test_metrics_up_to_the_last_complete_line(client, serve_runs):
    f = serve_runs["gpt"] / "metrics.jsonl"
    lines = [json.loads(l) for l in f.read_text().splitlines()]
    d = client.get("/api/runs/gpt/metrics").json()
    assert d["records"] == lines and d["total"] == len(lines) and any("loss" in r for r in lines)
    original = f.read_text()
    try:
        with open(f, "a") as fh:  # a run still training: a line half written
            fh.write('{"step": 99, "loss": 1.5, "lr": 0.001, "tok_per_s": 10.0')
        assert client.get("/api/runs/gpt/metrics").json()["records"] == lines
        with open(f, "a") as fh:
            fh.write(', "mfu": NaN}\n')
        d = client.get(f"/api/runs/gpt/metrics?offset={len(lines)}").json()
        assert d["records"] == [{"step": 99, "loss": 1.5, "lr": 0.001, "tok_per_s": 10.0, "mfu": None}]
    finally:
        f.write_text(original)


def test_pages_and_openapi(client):
    assert 'id="fm-text"' in client.get("/").text
    assert "c-loss" in client.get("/run/gpt").text
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/runs", "/api/fill-mask", "/api/generate", "/api/generate/stream", "/api/classify",
              "/api/similarity", "/api/cost", "/api/runs/{name}/metrics"):
        assert p in paths, p


def _one_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    d = r.json()
    assert list(d) == ["error"] and isinstance(d["error"], str) and "\n" not in d["error"] and d["error"]
    assert "Traceback" not in r.text
    return d["error"]


HOSTILE = [
    ("oversized body", "post", "/api/fill-mask", {"run": "bert", "text": "x" * (MAX_BODY + 10)}, 413, "over 64 KiB"),
    ("prompt over the window", "post", "/api/generate", {"run": "gpt", "prompt": "fox " * 400}, 400,
     "the model's window is 64"),
    ("huge max_new_tokens", "post", "/api/generate", {"run": "gpt", "prompt": "a", "max_new_tokens": 10**12}, 422,
     "max_new_tokens: Input should be less than or equal to 2048"),
    ("huge max_new_tokens, streamed", "post", "/api/generate/stream",
     {"run": "gpt", "prompt": "a", "max_new_tokens": 10**12}, 422, "max_new_tokens"),
    ("unknown run", "post", "/api/fill-mask", {"run": "nope", "text": "a [MASK]"}, 404, "unknown run nope"),
    ("a path for a run", "post", "/api/fill-mask", {"run": "../bert", "text": "a [MASK]"}, 404, "never given as paths"),
    ("an absolute path for a run", "post", "/api/generate", {"run": "/etc/passwd", "prompt": "a"}, 404, "unknown run"),
    ("a path in the metrics URL", "get", "/api/runs/..%2F..%2Fetc/metrics", None, 404, "no such page or endpoint"),
    ("a path to a static file", "get", "/static/..%2Fapi.py", None, 404, "no such page"),
    ("a file beside the static ones", "get", "/static/api.py", None, 404, "no such file: 'api.py'"),
    ("a path for a cost model", "post", "/api/cost", {"models": ["/etc/passwd"]}, 400, "unknown model"),
    ("a run file for a cost model", "post", "/api/cost", {"models": ["gpt/run.json"]}, 400, "unknown model"),
    ("unknown hardware", "post", "/api/cost", {"models": ["gpt1"], "hardware": "h900"}, 400, "h900"),
    ("wrong capability", "post", "/api/fill-mask", {"run": "gpt", "text": "a [MASK]"}, 400, "cannot fill-mask"),
    ("no [MASK]", "post", "/api/fill-mask", {"run": "bert", "text": "no mask here"}, 400, "holds no [MASK]"),
    ("not JSON", "post", "/api/generate", b"{nope", 422, "not valid JSON"),
    ("a string for a number", "post", "/api/generate", {"run": "gpt", "prompt": "a", "temperature": "hot"}, 422,
     "temperature"),
    ("negative temperature", "post", "/api/generate", {"run": "gpt", "prompt": "a", "temperature": -1}, 422,
     "temperature"),
    ("a tiny temperature", "post", "/api/generate", {"run": "gpt", "prompt": "a", "temperature": 1e-30}, 400,
     "too small"),
    ("astronomical tokens", "post", "/api/cost", {"models": ["gpt1"], "tokens": 1e300}, 422, "tokens"),
    ("astronomical price", "post", "/api/cost", {"models": ["gpt1"], "price": 1e300}, 422, "price"),
    ("a huge top-k", "post", "/api/generate", {"run": "gpt", "prompt": "a", "top_k": 10**6, "max_new_tokens": 2},
     200, None),
    ("missing field", "post", "/api/similarity", {"run": "gpt", "a": "x"}, 422, "b: Field required"),
    ("a bad pooling", "post", "/api/similarity", {"run": "gpt", "a": "x", "b": "y", "pooling": "cls"}, 400, "[CLS]"),
    ("top-k over the vocabulary", "post", "/api/fill-mask", {"run": "bert", "text": "a [MASK]", "top_k": 999}, 400,
     "vocabulary"),
    ("a negative offset", "get", "/api/runs/gpt/metrics?offset=-1", None, 422, "offset"),
    ("an empty text list", "post", "/api/classify", {"run": "ft", "texts": []}, 422, "texts"),
    ("an unknown page", "get", "/nowhere", None, 404, "no such page or endpoint: /nowhere"),
    ("an unknown run's page", "get", "/run/nope", None, 404, "unknown run nope"),
    ("an unknown run's metrics", "get", "/api/runs/nope/metrics", None, 404, "unknown run nope"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input_is_one_4xx_json_message(client, case):
    _, method, url, body, status, fragment = case
    if method == "get":
        r = client.get(url)
    elif isinstance(body, bytes):
        r = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(url, json=body)
    if status == 200:  # accepted, and answered
        assert r.status_code == 200 and r.json()["tokens"] >= 1
    else:
        assert fragment in _one_error(r, status)
    # and the server keeps serving
    assert client.post("/api/fill-mask", json={"run": "bert", "text": "a [MASK] b"}).status_code == 200


def test_oversized_chunked_body_without_a_length(client):
    def chunks():
        for _ in range(20):
            yield b'{"run": "bert", "text": "' + b"x" * 8192
    r = client.post("/api/fill-mask", content=chunks(), headers={"content-type": "application/json"})
    assert "over 64 KiB" in _one_error(r, 413)

    def small():  # a chunked body under the limit is served
        yield b'{"run": "bert", '
        yield b'"text": "a [MASK] b"}'
    r = client.post("/api/fill-mask", content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["masks"]) == 1


def test_a_text_is_never_read_as_a_file(client, serve_runs):
    """`pretune classify @FILE` reads FILE; the API classifies the string itself."""
    secret = serve_runs["ft"] / "run.json"
    r = client.post("/api/classify", json={"run": "ft", "texts": [f"@{secret}"]})
    assert r.status_code == 200 and r.json()["results"][0]["text"] == f"@{secret}"


def test_serve_verb_without_the_extra_says_what_to_install(monkeypatch, capsys, serve_runs):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "fastapi" else real(n, *a))
    assert main(["serve", str(serve_runs["gpt"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'pretune[serve]'" in err and "fastapi" in err


def test_serve_verb_warns_off_loopback(monkeypatch, capsys, serve_runs):
    import uvicorn
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(host=host, port=port))
    assert main(["serve", str(serve_runs["gpt"]), str(serve_runs["bert"]), "--port", "8123"]) == 0
    assert seen == {"host": "127.0.0.1", "port": 8123} and "warning" not in capsys.readouterr().err
    assert main(["serve", str(serve_runs["gpt"]), "--host", "0.0.0.0"]) == 0
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["learned", "rotary", "moe"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ragged_batch_equals_each_row_alone(kind, temperature):
    """inference.batched: prompts of 1, 3 and 7 tokens decoded together, each row with its own
    budget and seed, give `generate`'s tokens for each alone (greedy and sampled), stopping at the
    window (24) like it."""
    from pretune import Transformer
    from pretune.config.model import ModelConfig

    extra = {"rotary": dict(position="rotary", norm="rmsnorm", mlp="swiglu"),
             "moe": dict(n_expert=4, top_k=2)}.get(kind, {})
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, max_seq_len=24, n_layer=2, n_head=2, d_model=32, dropout=0.0,
                                **extra)).eval()
    for prompts, budgets in (([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]], [30, 5, 12]),  # ragged
                             ([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [30, 5, 12])):  # aligned: the plain pass
        _ragged_case(m, prompts, budgets, temperature)


def _ragged_case(m, prompts, budgets, temperature):
    from pretune.inference.batched import Sampling, generate_ragged
    from pretune.inference.generate import generate

    opts = [Sampling(n, temperature, None, None, seed=s) for n, s in zip(budgets, (1, 2, 3))]
    rows = [[] for _ in prompts]
    for step in generate_ragged(m, prompts, opts):
        for b, t in enumerate(step):
            if t is not None:
                rows[b].append(t)
    for b, (pr, n) in enumerate(zip(prompts, budgets)):
        want = generate(m, torch.tensor([pr]), n, temperature=temperature, top_k=None, top_p=None, seed=b + 1)
        assert rows[b] == want[0, len(pr):].tolist(), b


def test_load_benchmark_runs(tmp_path):
    """pretune_bench.serve_load end to end at a tiny size (the figures are in docs/serve.md, no timing here)."""
    from pretune_bench.serve_load import batching, load
    L = load(12, workdir=tmp_path)
    assert L["errors"] == 0 and L["requests"] == 12 and L["p99_ms"] >= L["p50_ms"] > 0
    b = batching("tiny", concurrent=4, prompt_tokens=8, new_tokens=4, rounds=1, workdir=tmp_path)
    assert set(b["tokens_per_s"]) == {"batched", "one at a time"} and b["ratio"] > 0


JUNK = [None, -1, 0, 10**30, -(10**30), 1e-30, 3.5, "", "x" * 9000, "../../etc/passwd", [], [1, "a"], {"a": 1},
        True]
BASE = {"/api/fill-mask": {"run": "bert", "text": "a [MASK] b"},
        "/api/generate": {"run": "gpt", "prompt": "a", "max_new_tokens": 2},
        "/api/classify": {"run": "ft", "texts": ["a good film"]},
        "/api/similarity": {"run": "bert", "a": "x", "b": "y"},
        "/api/cost": {"models": ["gpt1"]}}
FIELDS = {"/api/fill-mask": ["run", "text", "top_k"],
          "/api/generate": ["run", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"],
          "/api/classify": ["run", "texts"], "/api/similarity": ["run", "a", "pooling", "normalize"],
          "/api/cost": ["models", "tokens", "hardware", "gpus", "mfu", "price"]}


def test_junk_in_every_field_is_never_a_500(client):
    """Each field of each endpoint given each junk value (and NaN / Infinity, which Python's JSON
    reads): an answer or a 4xx with one message, never a 500."""
    for url, fields in FIELDS.items():
        for f in fields:
            for v in JUNK:
                r = client.post(url, json={**BASE[url], f: v})
                assert r.status_code < 500, (url, f, v, r.text)
                if r.status_code >= 400:
                    _one_error(r, r.status_code)
            for raw in ("NaN", "Infinity", "-Infinity"):
                body = json.dumps({**BASE[url], f: 0}).replace(f'"{f}": 0', f'"{f}": {raw}')
                r = client.post(url, content=body, headers={"content-type": "application/json"})
                assert r.status_code < 500, (url, f, raw, r.text)


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_quantized_server_answers_as_the_command_line(serve_runs, capsys, weights):
    """`pretune serve --weights W` serves what `pretune generate --weights W` prints, alone and batched."""
    from pretune.cli.parser import call_verb

    q = load_runs([serve_runs["gpt"], serve_runs["bert"]], weights=weights)
    app = create_app(q, max_batch=16, gather_s=0.3)
    prompts = ["The quick brown fox", "Washington is the capital"]
    want = [call_verb("generate", [p, "--run", str(serve_runs["gpt"]), "--max-new-tokens", "12",
                                   "--temperature", "0", "--weights", weights])[0] for p in prompts]
    text = "Washington is the [MASK] of the US."
    fm = json.loads(_cli_json(capsys, ["fill-mask", text, "--run", str(serve_runs["bert"]), "--top-k", "3",
                                       "--json-out", "--weights", weights]))

    async def both():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            rs = await asyncio.gather(*[c.post("/api/generate", json={"run": "gpt", "prompt": p, "max_new_tokens": 12,
                                                                        "temperature": 0.0}) for p in prompts])
            return [r.json()["text"] for r in rs]

    with TestClient(app, raise_server_exceptions=False) as c:
        got = [c.post("/api/generate", json={"run": "gpt", "prompt": p, "max_new_tokens": 12,
                                             "temperature": 0.0}).json()["text"] for p in prompts]
        assert got == want
        masks = c.post("/api/fill-mask", json={"run": "bert", "text": text, "top_k": 3}).json()["masks"]
        assert [[[m["token"], m["probability"]] for m in ms] for ms in masks] == fm
        s = c.post("/api/similarity", json={"run": "gpt", "a": "the film was good", "b": "the film was bad"}).json()
        assert -1.0 <= s["similarity"] <= 1.0
        # concurrent requests, while the app (and its batcher) runs: the batched decoder on quantized weights
        assert asyncio.run(both()) == want
