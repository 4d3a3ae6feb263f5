"""The JSON API and the pages (FastAPI; OpenAPI at /openapi.json, browsable at /docs).

Every error is a 4xx JSON body `{"error": "<one line>"}`: bad values (422), bad input the library
refuses (400, the command line's message), an unknown run (404), a body over the limit (413).
No endpoint reads a path the request names: runs are looked up by name among those loaded, the
cost planner takes presets and loaded runs' names only, texts are never read as @FILE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PretuneError
from ..inference.batched import Sampling
from . import handlers
from .batcher import Batcher, Request as GenRequest
from .runs import Loaded, Refused, UnknownRun, get_run

MAX_BODY = 64 * 1024  # bytes; a request body over this is refused (413) before it is parsed
MAX_TEXT = 8000  # characters of one text
MAX_NEW = 2048  # max_new_tokens accepted (then clipped to the window, as `pretune generate` does)
COST_PRESETS = ("gpt1", "gpt2-xl", "gpt3-175b", "gpt4-moe")


class FillMask(BaseModel):
    run: str = Field(max_length=200)
    text: str = Field(min_length=1, max_length=MAX_TEXT, description='e.g. "Washington is the [MASK] of the US."')
    top_k: int = Field(5, ge=1, le=1000)


class Generate(BaseModel):
    run: str = Field(max_length=200)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    max_new_tokens: int = Field(100, ge=1, le=MAX_NEW)
    temperature: float = Field(0.8, ge=0, le=100, description="0 = greedy; else at least 1e-3")
    top_k: int = Field(50, ge=0, le=1_000_000, description="0 = all tokens")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(1337, ge=0, le=2**63 - 1)


class Classify(BaseModel):
    run: str = Field(max_length=200)
    texts: list[str] = Field(min_length=1, max_length=256, description='"A<TAB>B" for a pair task')


class Similarity(BaseModel):
    run: str = Field(max_length=200)
    a: str = Field(min_length=1, max_length=MAX_TEXT)
    b: str = Field(min_length=1, max_length=MAX_TEXT)
    pooling: Optional[str] = Field(None, max_length=20, description="mean | cls | last; default: as `pretune embed`")
    normalize: Optional[bool] = None


class Cost(BaseModel):
    models: list[str] = Field(min_length=1, max_length=16, description="presets or loaded runs' names")
    tokens: float = Field(300e9, gt=0, le=1e18)
    hardware: str = Field("a100", max_length=40)
    gpus: int = Field(1024, ge=1, le=10_000_000)
    mfu: float = Field(0.4, gt=0, le=1)
    price: Optional[float] = Field(None, ge=0, le=1e6)


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def _page(name: str) -> str:
    return resources.files("pretune.serve").joinpath("static", name).read_text(encoding="utf-8")


def create_app(runs: dict[str, Loaded], max_batch: int = 16, gather_s: float = 0.005) -> FastAPI:
    """The app over `runs` (name -> Loaded); generation requests of a run are batched up to
    `max_batch`, gathered for `gather_s` after the first arrives."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for b in app.state.batchers.values():
            b.close()

    app = FastAPI(lifespan=lifespan, title="pretune serve", version="1", description="fill-mask, generation (streamed), "
                  "classification, embedding similarity, the cost planner and a run's metrics, over the loaded runs")
    app.state.runs = runs
    app.state.batchers = {n: Batcher(r, max_batch, gather_s) for n, r in runs.items() if r.kind == "decoder"}

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        n = request.headers.get("content-length")
        if n is not None and (not n.isdigit() or int(n) > MAX_BODY):
            return _error(413, f"the request body is over {MAX_BODY // 1024} KiB")
        if n is None and request.method in ("POST", "PUT", "PATCH"):  # chunked: read it here, counting
            chunks, size, more = [], 0, True
            while more:
                msg = await request.receive()
                if msg["type"] != "http.request":
                    break
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                if size > MAX_BODY:
                    return _error(413, f"the request body is over {MAX_BODY // 1024} KiB")
                more = msg.get("more_body", False)
            body, sent = b"".join(chunks), [False]

            async def replay():
                if sent[0]:
                    return {"type": "http.disconnect"}
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            request._receive = replay
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        e = (exc.errors() or [{}])[0]
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            msg, loc = "the body is not valid JSON", "body"
        return _error(422, f"{loc}: {msg}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        if exc.status_code == 404:
            return _error(404, f"no such page or endpoint: {request.url.path[:80]} (the API: /docs)")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(PretuneError)
    async def _bad(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(UnknownRun)
    async def _unknown(request, exc):
        return _error(404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(Refused)
    async def _value(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # a bug: one line, never the traceback
        return _error(500, f"internal error ({type(exc).__name__})")

    # ---- pages ---------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return _page("index.html")

    @app.get("/run/{name}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(name: str):
        get_run(runs, name)
        return _page("run.html")

    @app.get("/static/{file}", include_in_schema=False)
    def static(file: str):
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}
        if file not in kinds:  # a fixed list: no path from the request reaches the file system
            raise UnknownRun(f"no such file: {file[:40]!r}")
        return HTMLResponse(_page(file), media_type=kinds[file])

    # ---- the API -------------------------------------------------------------------
    @app.get("/api/runs", summary="The loaded runs, what each can do, and the cost planner's presets")
    def list_runs():
        from ..config.presets import PRESETS
        from ..hardware.table import HARDWARE
        return {"runs": [r.describe() for r in runs.values()], "cost_presets": list(COST_PRESETS),
                "presets": list(PRESETS), "hardware": list(HARDWARE)}

    @app.post("/api/fill-mask", summary="Each [MASK]'s top-k tokens and probabilities (as `pretune fill-mask --json-out`)")
    def fill_mask(body: FillMask):
        return handlers.fill_mask(get_run(runs, body.run, "fill-mask"), body.text, body.top_k)

    def _submit(body: Generate, deliver):
        r = get_run(runs, body.run, "generate")
        if 0 < body.temperature < 1e-3:  # logits / T overflows to inf: no distribution to sample
            raise Refused(f"temperature {body.temperature:g} is too small to sample with; use 0 for greedy or >= 0.001")
        ids = handlers.prompt_ids(r, body.prompt)
        opts = Sampling(body.max_new_tokens, body.temperature, body.top_k or None, body.top_p, body.seed)
        req = GenRequest(ids, opts, deliver)
        app.state.batchers[r.name].submit(req)
        return r, req

    def _channel():
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        return q, lambda kind, v: loop.call_soon_threadsafe(q.put_nowait, (kind, v))

    @app.post("/api/generate", summary="Continue a prompt (as `pretune generate`); the whole text at the end")
    async def generate(body: Generate):
        q, deliver = _channel()
        r, req = _submit(body, deliver)
        ids = []
        try:
            while True:
                kind, v = await q.get()
                if kind == "token":
                    ids.append(v)
                elif kind == "error":
                    return _error(400, v)
                else:
                    return {"run": r.name, "prompt": body.prompt, "text": r.tok.decode(ids), "tokens": len(ids)}
        finally:
            req.cancelled.set()  # done, or the client went away: its row stops being served

    @app.post("/api/generate/stream", summary="Continue a prompt, streamed: server-sent events `token` "
              "(data: {text, id}) as each token is produced, then `done` (data: {text, tokens})")
    async def generate_stream(body: Generate, request: Request):
        q, deliver = _channel()
        r, req = _submit(body, deliver)

        async def events():
            ids, sent = [], ""
            try:
                while True:
                    kind, v = await q.get()
                    if kind == "token":
                        ids.append(v)
                        text = r.tok.decode(ids)
                        # a character cut between tokens decodes as U+FFFD: wait for the rest
                        if text.endswith("\ufffd") or not text.startswith(sent):
                            continue
                        yield f"event: token\ndata: {json.dumps({'text': text[len(sent):], 'id': v})}\n\n"
                        sent = text
                    elif kind == "error":
                        yield f"event: error\ndata: {json.dumps({'error': v})}\n\n"
                        return
                    else:
                        text = r.tok.decode(ids)
                        if text != sent and text.startswith(sent):  # what was held back
                            yield f"event: token\ndata: {json.dumps({'text': text[len(sent):], 'id': None})}\n\n"
                        yield f"event: done\ndata: {json.dumps({'text': text, 'tokens': len(ids)})}\n\n"
                        return
            finally:
                req.cancelled.set()  # a client gone: its row stops being served
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/classify", summary="Each text's label and every label's probability (as `pretune classify --json-out`)")
    def classify(body: Classify):
        for t in body.texts:
            if len(t) > MAX_TEXT:
                raise Refused(f"a text is over {MAX_TEXT} characters")
        return {"results": handlers.classify(get_run(runs, body.run, "classify"), body.texts)}

    @app.post("/api/similarity", summary="The cosine similarity of two texts' embeddings (as `pretune embed`'s vectors)")
    def similarity(body: Similarity):
        return handlers.similarity(get_run(runs, body.run, "similarity"), body.a, body.b, body.pooling, body.normalize)

    @app.post("/api/cost", summary="The cost planner (as `pretune cost --json`), for presets and loaded runs")
    def cost(body: Cost):
        if not math.isfinite(body.tokens) or (body.price is not None and not math.isfinite(body.price)):
            raise Refused("tokens and price must be finite numbers")
        return handlers.cost(runs, body.models, body.tokens, body.hardware, body.gpus, body.mfu, body.price)

    @app.get("/api/runs/{name}/metrics", summary="The run's metrics.jsonl records, up to its last complete "
             "line (poll it while the run trains); `offset`: skip the records already read")
    def metrics(name: str, offset: int = Query(0, ge=0, le=10**9)):
        return handlers.metrics(get_run(runs, name), offset)

    return app
