"""Side-by-side speed: pretune against the implementation most users would otherwise run.

Every benchmark builds pretune and the reference (Hugging Face `transformers`,
or nanoGPT's `get_batch` for the loader) on the identical configuration: the
same shapes, the same weights (copied from pretune into the reference through
`interop.hf`), the same batch and the same thread count. Each side is warmed
up, then the two alternate for `rounds` rounds, the order flipping every round
(A B, B A, A B, ...), so a change in the machine's load (a shared CPU) falls on
both alike; the medians and their ratio are reported. A ratio > 1 means
pretune is faster. Wall-clock time is the measure; each side's process CPU
time is kept too, as a check on how much the machine was shared.

A target is a ratio in one run, printed next to it; it is never a timing
assertion in a test. Run `pretune bench` (the suite) or `benchmarks/*.py`.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import torch

from .config.model import ModelConfig
from .config.presets import preset

# The shapes of the issue, plus a tiny one for the tests.
GPT_SHAPES = {
    "mini": dict(preset="gpt-mini", batch=16, seq=256),  # 4 layers, d=256, 4 heads, vocab 8192
    "gpt2": dict(preset="gpt2", batch=4, seq=256),  # 12 layers, d=768, 12 heads, vocab 50,257
    "tiny": dict(preset="gpt-mini", batch=2, seq=32, n_layer=2, d_model=64, n_head=2, vocab_size=512),
}
BERT_SHAPES = {
    "mini": dict(preset="bert-mini", batch=32, seq=128),  # 4 layers, d=256, 4 heads, vocab 30,522
    "tiny": dict(preset="bert-mini", batch=2, seq=32, n_layer=2, d_model=64, n_head=2, vocab_size=512),
}
TARGETS = {  # pretune / reference, from the issue
    ("gpt_train", "mini", "fp32"): 1.25,
    ("gpt_train", "gpt2", "fp32"): 1.10,
    ("bert_mlm", "mini", "fp32"): 1.5,
    ("generate", "mini", 1): 3.0,
    ("generate", "gpt2", 1): 3.0,
}
PEAK_FRACTION_TARGET = 0.70  # GPT-2-small fp32: 6·N·tokens/s over the measured fp32 matmul peak


def _config(shape: dict, **over) -> tuple[ModelConfig, int, int]:
    s = dict(shape)
    name, B, T = s.pop("preset"), s.pop("batch"), s.pop("seq")
    return preset(name, dropout=0.0, **{**s, **over}), B, T


_DEFAULT_THREADS = torch.get_num_threads()


def set_threads(threads: int | None) -> int:
    """Both sides run with the same intra-op thread count (None: torch's default)."""
    torch.set_num_threads(threads or _DEFAULT_THREADS)
    return torch.get_num_threads()


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
              progress: bool = False, desc: str = "") -> dict[str, dict[str, list[float]]]:
    """Time each function once per round, alternating their order every round.
    Returns {name: {"wall": [s, ...], "cpu": [s, ...]}} (warm-up calls not included)."""
    from tqdm import tqdm

    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in tqdm(range(rounds), desc=desc, unit="round", disable=not progress, leave=False):
        for n in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            out[n]["wall"].append(time.perf_counter() - t0)
            out[n]["cpu"].append(time.process_time() - c0)
    return out


def _side(times: dict[str, list[float]], work: float, unit: str, flops_per_unit: float | None = None) -> dict:
    med = statistics.median(times["wall"])
    d = {"median_s": med, "min_s": min(times["wall"]), "cpu_s": statistics.median(times["cpu"]),
         "times_s": [round(t, 4) for t in times["wall"]], unit: work / med}
    if flops_per_unit:
        d["gflops"] = work * flops_per_unit / med / 1e9
    return d


def _result(bench: str, shape: str, params: dict, times: dict, work: float, unit: str, rounds: int,
            warmup: int, flops_per_unit: float | None = None, target_key=None, **extra) -> dict:
    pt = _side(times["pretune"], work, unit, flops_per_unit)
    ref = _side(times["reference"], work, unit, flops_per_unit)
    ratio = ref["median_s"] / pt["median_s"]
    target = TARGETS.get(target_key) if target_key else extra.pop("target", None)
    return {"bench": bench, "shape": shape, **params, "threads": torch.get_num_threads(),
            "rounds": rounds, "warmup": warmup, "unit": unit, "pretune": pt, "reference": ref,
            "ratio": ratio, "target": target, "meets_target": None if target is None else ratio >= target,
            **extra}


# ---------------------------------------------------------------------------
# Building both sides on the same weights
# ---------------------------------------------------------------------------

def hf_gpt2(model) -> torch.nn.Module:
    """A `GPT2LMHeadModel` (SDPA attention) holding exactly `model`'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hc = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layer,
                    n_head=c.n_head, n_inner=c.ffn_dim, activation_function="gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=c.norm_eps,
                    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = GPT2LMHeadModel._from_config(hc, attn_implementation="sdpa")
    _copy_weights(model, hf, allowed_missing={"lm_head.weight"})  # tied to wte
    return hf


def hf_bert_mlm(model) -> torch.nn.Module:
    """A `BertForMaskedLM` (SDPA attention) holding exactly `model`'s weights."""
    from transformers import BertConfig, BertForMaskedLM

    c = model.config
    hc = BertConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer,
                    num_attention_heads=c.n_head, intermediate_size=c.ffn_dim, hidden_act="gelu",
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    max_position_embeddings=c.max_seq_len, type_vocab_size=c.type_vocab_size,
                    layer_norm_eps=c.norm_eps, tie_word_embeddings=True, pad_token_id=0)
    hf = BertForMaskedLM._from_config(hc, attn_implementation="sdpa")
    _copy_weights(model, hf, allowed_missing={"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"})
    return hf


def _copy_weights(model, hf, allowed_missing: set[str]) -> None:
    from .interop.hf import tensors_for_hf

    sd, _ = tensors_for_hf(model)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    bad = [k for k in missing if k not in allowed_missing] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights did not map onto the reference: {bad[:4]}")


class _Repeat:
    """The same batch every step: both sides see identical data, and no loader time is measured."""

    def __init__(self, batch: dict):
        self.b = batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.b


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _hf_step(hf, opt, precision: str, **inputs):
    """What `transformers.Trainer` does by default: forward with labels (its own loss),
    backward, clip the global norm to 1.0, fused AdamW (`adamw_torch_fused`), zero the grads."""
    def step():
        with _autocast(precision):
            loss = hf(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _trainer(model, batch: dict, loss_fn, precision: str, compile: bool = False):
    from .training.config import TrainConfig
    from .training.loop import Trainer

    tc = TrainConfig(steps=1 << 30, batch_size=batch["input_ids"].shape[0], warmup=0, device="cpu",
                     precision=precision, compile=compile, grad_clip=1.0)
    tr = Trainer(model, tc, _Repeat(batch), loss_fn, tempfile.gettempdir(), progress=False)
    return tr


def six_n(c: ModelConfig) -> int:
    """N of 6·N FLOPs per token: every parameter but the position table, the tied W_e
    once (the output projection uses it), vocabulary padding not counted."""
    from .models.counting import count_params

    p = count_params(c.replace(vocab_multiple=1))
    pos = c.max_seq_len * c.d_model if c.position == "learned" else 0
    return p["total"] - pos


# ---------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------

def _peak_fn(n: int = 1024):
    """One timed fp32 matmul rate, for the alternation: the peak measured under the same load."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    rates: list[float] = []

    def run():
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
        rates.append(best)
    return run, rates


def gpt_train(shape: str = "mini", precision: str = "fp32", rounds: int = 5, warmup: int = 1,
              threads: int | None = None, compile: bool = False, peak: bool | None = None,
              progress: bool = False) -> dict:
    """GPT training step (forward, backward, clip, AdamW): pretune's `Trainer.train_step`
    against `GPT2LMHeadModel` (SDPA) stepped the way `transformers.Trainer` steps it.
    `peak` (default: on for the GPT-2 shape) adds a matmul timing to every round, and
    reports 6·N·tokens/s as a fraction of it."""
    from .objectives.linear_cross_entropy import IGNORE
    from .objectives.losses import l1_loss

    set_threads(threads)
    cfg, B, T = _config(GPT_SHAPES[shape])
    torch.manual_seed(0)
    from .models.transformer import Transformer

    model = Transformer(cfg)
    hf = hf_gpt2(model).train()
    x = torch.randint(cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
    with torch.no_grad():  # same weights, same loss: the reference predicts the first T - 1 targets
        t = batch["targets"].clone()
        t[:, -1] = IGNORE
        same_loss = (l1_loss(model, batch["input_ids"], t).item(),
                     hf(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.item())
    tr = _trainer(model, batch, lambda m, b: (l1_loss(m, b["input_ids"], b["targets"]), {}), precision, compile)
    # the reference shifts the labels itself: it sees the same T inputs, and predicts T - 1 of them
    opt = torch.optim.AdamW(hf.parameters(), lr=tr.tc.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    fns = {"pretune": tr.train_step, "reference": _hf_step(hf, opt, precision, input_ids=batch["input_ids"],
                                                           labels=batch["input_ids"])}
    peak = shape == "gpt2" if peak is None else peak
    rates: list[float] = []
    if peak:
        fns["peak"], rates = _peak_fn()
    t0 = time.perf_counter()
    tr.train_step()  # the first step (compiles, when asked); timed apart
    first_step_s = time.perf_counter() - t0
    times = alternate(fns, rounds, warmup, progress, f"gpt_train {shape} {precision}")
    n = six_n(cfg)
    res = _result("gpt_train", shape, {"precision": precision, "batch": B, "seq": T, "compile": compile,
                                       "six_n_params": n}, times, B * T, "tokens_per_s", rounds, warmup,
                  flops_per_unit=6 * n, target_key=("gpt_train", shape, precision) if not compile else None,
                  first_step_s=first_step_s, initial_loss={"pretune": same_loss[0], "reference": same_loss[1]})
    if rates:
        pk = statistics.median(rates)
        res["fp32_matmul_peak_gflops"] = pk / 1e9
        res["fraction_of_peak"] = res["pretune"]["gflops"] * 1e9 / pk
        res["fraction_of_peak_target"] = PEAK_FRACTION_TARGET if precision == "fp32" else None
    return res


def variant_gain(shape: str = "mini", variant: str = "compile", rounds: int = 5, warmup: int = 1,
                 threads: int | None = None, progress: bool = False) -> dict:
    """pretune against itself: its training step with `variant` ("compile": `torch.compile`;
    "bf16": bf16 autocast) on the "pretune" side, the plain fp32 eager step on the
    "reference" side, alternated like every benchmark, same weights and batch.
    `setup_s` is the first variant step's time minus an eager step's (the compile time)."""
    from .models.transformer import Transformer
    from .objectives.losses import l1_loss

    set_threads(threads)
    cfg, B, T = _config(GPT_SHAPES[shape])
    torch.manual_seed(0)
    eager_model = Transformer(cfg)
    compiled_model = Transformer(cfg)
    compiled_model.load_state_dict(eager_model.state_dict())
    x = torch.randint(cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
    loss = lambda m, b: (l1_loss(m, b["input_ids"], b["targets"]), {})  # noqa: E731
    if variant not in ("compile", "bf16"):
        raise ValueError(f"unknown variant {variant!r}")
    eager = _trainer(eager_model, batch, loss, "fp32")
    comp = _trainer(compiled_model, batch, loss, "bf16" if variant == "bf16" else "fp32",
                    compile=variant == "compile")
    t0 = time.perf_counter()
    eager.train_step()
    eager_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    comp.train_step()
    setup_s = time.perf_counter() - t0 - eager_s
    times = alternate({"pretune": comp.train_step, "reference": eager.train_step}, rounds, warmup, progress,
                      f"{variant} vs fp32 eager, {shape}")
    return _result(variant, shape, {"batch": B, "seq": T}, times, B * T, "tokens_per_s", rounds, warmup,
                   setup_s=setup_s, target=1.3 if variant == "bf16" and cpu_has_native_bf16() and shape == "gpt2"
                   else None)


def bert_mlm(shape: str = "mini", rounds: int = 5, warmup: int = 1, threads: int | None = None,
             precision: str = "fp32", progress: bool = False) -> dict:
    """BERT MLM training step: pretune (the MLM head on the masked rows only) against
    `BertForMaskedLM` (the head on every position), same weights, same masked batch."""
    from .models.transformer import Transformer
    from .objectives.linear_cross_entropy import IGNORE
    from .objectives.masking import mlm_mask
    from .objectives.losses import mlm_nsp_loss

    set_threads(threads)
    cfg, B, T = _config(BERT_SHAPES[shape], nsp_head=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    hf = hf_bert_mlm(model).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(min(1000, cfg.vocab_size // 2), cfg.vocab_size, (B, T), generator=g)  # no special ids
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    special = (ids == 101) | (ids == 102)
    masked, labels = mlm_mask(ids, special, 103, cfg.vocab_size, g)
    seg = torch.zeros_like(ids)
    seg[:, T // 2:] = 1
    att = torch.ones_like(ids, dtype=torch.bool)
    batch = {"input_ids": masked, "segment_ids": seg, "attention_mask": att, "labels": labels}
    tr = _trainer(model, batch, mlm_nsp_loss, precision)
    opt = torch.optim.AdamW(hf.parameters(), lr=tr.tc.lr, weight_decay=0.1, fused=True)
    fns = {"pretune": tr.train_step,
           "reference": _hf_step(hf, opt, precision, input_ids=masked, token_type_ids=seg,
                                 attention_mask=att.long(), labels=labels)}
    times = alternate(fns, rounds, warmup, progress, f"bert_mlm {shape}")
    return _result("bert_mlm", shape, {"precision": precision, "batch": B, "seq": T,
                                       "masked_fraction": float((labels != IGNORE).float().mean())},
                   times, B * T, "tokens_per_s", rounds, warmup, target_key=("bert_mlm", shape, precision))


def generation(shape: str = "mini", batch: int = 1, new_tokens: int = 256, prompt: int = 16, rounds: int = 3,
               warmup: int = 1, threads: int | None = None, progress: bool = False) -> dict:
    """Greedy decoding with a KV cache: pretune's `generate` (static cache) against
    `GPT2LMHeadModel.generate(use_cache=True, do_sample=False)`, same weights and prompt,
    exactly `new_tokens` new tokens each (no end-of-text stop)."""
    from .generate import generate
    from .models.transformer import Transformer

    set_threads(threads)
    cfg, _, _ = _config(GPT_SHAPES[shape])
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, prompt + new_tokens))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    hf = hf_gpt2(model).eval()
    x = torch.randint(cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    got: dict[str, torch.Tensor] = {}

    def ours():
        got["pretune"] = generate(model, x, new_tokens, temperature=0.0)

    @torch.no_grad()
    def theirs():
        got["reference"] = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                       pad_token_id=0, eos_token_id=None)

    times = alternate({"pretune": ours, "reference": theirs}, rounds, warmup, progress, f"generate {shape} b{batch}")
    a, b = got["pretune"][:, prompt:], got["reference"][:, prompt:]
    agree = float((a == b).float().mean()) if a.shape == b.shape else 0.0
    return _result("generate", shape, {"batch": batch, "prompt": prompt, "new_tokens": new_tokens},
                   times, batch * new_tokens, "tokens_per_s", rounds, warmup,
                   target_key=("generate", shape, batch), same_tokens_fraction=agree)


def _corpus_text(max_bytes: int) -> list[str]:
    """Documents of the built-in corpus (the King James Bible's chapters), up to max_bytes."""
    from .data.sources import bible

    docs, n = [], 0
    for d in bible():
        docs.append(d)
        n += len(d.encode())
        if n >= max_bytes:
            break
    return docs


def tokenization(tokenizer: str = "gpt2", max_bytes: int = 2_000_000, rounds: int = 3, warmup: int = 1,
                 threads: int | None = None, progress: bool = False) -> dict:
    """Tokenization MB/s: pretune's `Tokenizer.encode_batch` against `transformers`'
    fast tokenizer built on the same tokenizer.json, over the same documents."""
    from transformers import PreTrainedTokenizerFast

    from .data.tokenizers import load_tokenizer

    set_threads(threads)
    tok = load_tokenizer(tokenizer)
    ref = PreTrainedTokenizerFast(tokenizer_object=tok._tok)
    docs = _corpus_text(max_bytes)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    out: dict[str, list] = {}

    def ours():
        out["pretune"] = tok.encode_batch(docs, add_special_tokens=False)

    def theirs():
        out["reference"] = ref(docs, add_special_tokens=False)["input_ids"]

    times = alternate({"pretune": ours, "reference": theirs}, rounds, warmup, progress, "tokenize")
    n_tokens = sum(len(x) for x in out["pretune"])
    res = _result("tokenize", tokenizer, {"megabytes": mb, "tokens": n_tokens}, times, mb, "mb_per_s",
                  rounds, warmup, same_tokens=out["pretune"] == out["reference"])
    res["pretune"]["tokens_per_s"] = n_tokens / res["pretune"]["median_s"]
    return res


def loader(batch: int = 16, seq: int = 256, steps: int = 200, rounds: int = 3, warmup: int = 1,
           threads: int | None = None, data_dir: str | None = None, progress: bool = False) -> dict:
    """Loader tokens/s: `LMBatches` (a seeded generator per batch, resumable) against nanoGPT's
    `get_batch` (np.memmap windows at random offsets; Karpathy, nanoGPT train.py) on one shard."""
    import numpy as np

    from .data.loaders import LMBatches, Shard
    from .data.prepare import prepare

    set_threads(threads)
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pretune-bench-")
        data_dir = f"{tmp.name}/data"
        prepare(["bible"], "gpt2", data_dir, val_fraction=0.05, max_bytes=1_000_000, progress=False)
    try:
        ours_it = LMBatches(data_dir, "train", batch, seq, seed=0)
        data = Shard(data_dir, "train").tokens
        rng = np.random.default_rng(0)

        def ours():
            for _ in range(steps):
                next(ours_it)

        def get_batch():  # nanoGPT, train.py
            ix = torch.from_numpy(rng.integers(len(data) - seq, size=batch))
            x = torch.stack([torch.from_numpy(data[i:i + seq].astype(np.int64)) for i in ix.tolist()])
            y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + seq].astype(np.int64)) for i in ix.tolist()])
            return x, y

        def theirs():
            for _ in range(steps):
                get_batch()

        times = alternate({"pretune": ours, "reference": theirs}, rounds, warmup, progress, "loader")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return _result("loader", f"{batch}x{seq}", {"batch": batch, "seq": seq, "steps": steps}, times,
                   batch * seq * steps, "tokens_per_s", rounds, warmup)


# ---------------------------------------------------------------------------
# The suite, as `pretune bench` runs it
# ---------------------------------------------------------------------------

def suite_plan(quick: bool = False) -> list[tuple[str, Callable, dict]]:
    """(label, function, kwargs) of the standard suite. GPT-2-small steps take tens of
    seconds on two cores, so that shape runs few rounds; `quick` drops it."""
    plan = [
        ("gpt_train mini fp32", gpt_train, dict(shape="mini", precision="fp32", rounds=7)),
        ("gpt_train mini bf16", gpt_train, dict(shape="mini", precision="bf16", rounds=7)),
        ("bf16 gain mini", variant_gain, dict(shape="mini", variant="bf16", rounds=5)),
        ("bert_mlm mini", bert_mlm, dict(shape="mini", rounds=7)),
        ("generate mini b1", generation, dict(shape="mini", batch=1, rounds=3)),
        ("generate mini b8", generation, dict(shape="mini", batch=8, rounds=3)),
        ("tokenize gpt2", tokenization, dict(rounds=3)),
        ("loader 16x256", loader, dict(rounds=3)),
    ]
    if not quick:
        plan[2:2] = [
            ("gpt_train gpt2 fp32", gpt_train, dict(shape="gpt2", precision="fp32", rounds=3)),
            ("gpt_train gpt2 bf16", gpt_train, dict(shape="gpt2", precision="bf16", rounds=3)),
            ("bf16 gain gpt2", variant_gain, dict(shape="gpt2", variant="bf16", rounds=3)),
        ]
        plan[-2:-2] = [
            ("generate gpt2 b1", generation, dict(shape="gpt2", batch=1, rounds=2)),
            ("generate gpt2 b8", generation, dict(shape="gpt2", batch=8, rounds=2)),
        ]
    return plan


def run_suite(only: list[str] | None = None, quick: bool = False, rounds: int | None = None,
              threads: int | None = None, progress: bool = True) -> list[dict]:
    """Run the benchmarks whose label contains one of `only` (all by default)."""
    from tqdm import tqdm

    plan = [p for p in suite_plan(quick) if not only or any(o in p[0] for o in only)]
    results = []
    for label, fn, kw in tqdm(plan, desc="pretune bench", unit="bench", disable=not progress):
        kw = {**kw, "threads": threads, "progress": progress}
        if rounds:
            kw["rounds"] = rounds
        results.append(fn(**kw))
    return results


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (x86), read from /proc/cpuinfo."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe(r: dict) -> str:
    """One line of a result: medians, the ratio, the target."""
    unit = r["unit"]
    pt, ref = r["pretune"][unit], r["reference"][unit]
    what = {"gpt_train": f"GPT train {r['shape']} {r.get('precision')}", "bert_mlm": f"BERT MLM {r['shape']}",
            "generate": f"generate {r['shape']} b{r.get('batch')}",
            "compile": f"compiled/eager {r['shape']}", "bf16": f"bf16/fp32 pretune {r['shape']}", "tokenize": f"tokenize {r['shape']}",
            "loader": f"loader {r['shape']}"}[r["bench"]]
    pretty = unit.replace("_per_s", "/s").replace("mb", "MB")
    line = f"{what:<24} pretune {pt:>10,.1f} {pretty}  reference {ref:>10,.1f}  ratio {r['ratio']:5.2f}x"
    if r.get("target"):
        line += f"  (target {r['target']}x: {'met' if r['meets_target'] else 'NOT met'})"
    if "gflops" in r["pretune"]:
        line += f"  {r['pretune']['gflops']:.1f} GFLOP/s"
    if r.get("fraction_of_peak") is not None:
        line += f", {r['fraction_of_peak']:.0%} of the fp32 matmul peak ({r['fp32_matmul_peak_gflops']:.0f})"
    if r.get("setup_s") is not None and r["bench"] == "compile":
        line += f"  compile time {r['setup_s']:.0f} s"
    line += f"  [{r['rounds']} rounds, {r['threads']} threads]"
    return line


def check_finite(results: list[dict]) -> bool:
    return all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in results)
