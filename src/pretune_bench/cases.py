"""The benchmarks: each builds pretune and the Hugging Face reference on the same configuration and
weights and times them alternately (harness.py); training steps, generation, tokenization, loading."""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from pretune.models.counting import flop_params

from .harness import (BERT_SHAPES, GPT_SHAPES, PEAK_FRACTION_TARGET, _config, _hf_step, _result, _trainer, alternate,
                      cpu_has_native_bf16, set_threads)


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
    from pretune.interop.hf_weights import tensors_for_hf

    sd, _ = tensors_for_hf(model)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    bad = [k for k in missing if k not in allowed_missing] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights did not map onto the reference: {bad[:4]}")


# ---------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------

def _peak_fn(n: int = 1024, dtype: torch.dtype = torch.float32):
    """One timed matmul rate in `dtype` (the training's: fp32, or bf16 under autocast), for the
    alternation: the peak measured under the same load."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
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
    from pretune.objectives.linear_cross_entropy import IGNORE
    from pretune.objectives.losses import l1_loss

    set_threads(threads)
    cfg, B, T = _config(GPT_SHAPES[shape])
    torch.manual_seed(0)
    from pretune.models.transformer import Transformer

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
        fns["peak"], rates = _peak_fn(dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    t0 = time.perf_counter()
    tr.train_step()  # the first step (compiles, when asked); timed apart
    first_step_s = time.perf_counter() - t0
    times = alternate(fns, rounds, warmup, progress, f"gpt_train {shape} {precision}")
    n = flop_params(cfg)  # the one N of 6ND (models/counting.py)
    res = _result("gpt_train", shape, {"precision": precision, "batch": B, "seq": T, "compile": compile,
                                       "six_n_params": n}, times, B * T, "tokens_per_s", rounds, warmup,
                  flops_per_unit=6 * n, target_key=("gpt_train", shape, precision) if not compile else None,
                  first_step_s=first_step_s, initial_loss={"pretune": same_loss[0], "reference": same_loss[1]})
    if rates:
        pk = statistics.median(rates)
        res["fp32_matmul_peak_gflops" if precision == "fp32" else "bf16_matmul_peak_gflops"] = pk / 1e9
        res["fraction_of_peak"] = res["pretune"]["gflops"] * 1e9 / pk
        res["fraction_of_peak_target"] = PEAK_FRACTION_TARGET.get(precision)
    return res


def variant_gain(shape: str = "mini", variant: str = "compile", rounds: int = 5, warmup: int = 1,
                 threads: int | None = None, progress: bool = False) -> dict:
    """pretune against itself: its training step with `variant` ("compile": `torch.compile`;
    "bf16": bf16 autocast) on the "pretune" side, the plain fp32 eager step on the
    "reference" side, alternated like every benchmark, same weights and batch.
    `setup_s` is the first variant step's time minus an eager step's (the compile time)."""
    from pretune.models.transformer import Transformer
    from pretune.objectives.losses import l1_loss

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
    from pretune.models.transformer import Transformer
    from pretune.objectives.linear_cross_entropy import IGNORE
    from pretune.objectives.masking import mlm_mask
    from pretune.objectives.losses import mlm_nsp_loss

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
               warmup: int = 1, threads: int | None = None, progress: bool = False, weights: str = "fp32") -> dict:
    """Greedy decoding with a KV cache: pretune's `generate` (static cache) against
    `GPT2LMHeadModel.generate(use_cache=True, do_sample=False)`, same weights and prompt,
    exactly `new_tokens` new tokens each (no end-of-text stop). `weights`: pretune's side in
    fp32, bf16, int8 or int4 (models/quantize.py); the reference stays fp32. Beside the ratio,
    the memory-bandwidth roofline of pretune's variant: a token at batch 1 reads every weight
    byte once (and the KV cache), so tokens/s <= bandwidth / bytes per token."""
    from pretune.inference.generate import generate
    from pretune.models.quantize import cache_dtype, quantize_model, resident_bytes
    from pretune.models.transformer import Transformer

    set_threads(threads)
    cfg, _, _ = _config(GPT_SHAPES[shape])
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, prompt + new_tokens))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    hf = hf_gpt2(model).eval()
    if weights != "fp32":
        quantize_model(model, weights)
    x = torch.randint(cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    got: dict[str, torch.Tensor] = {}

    def ours():
        got["pretune"] = generate(model, x, new_tokens, temperature=0.0)

    @torch.no_grad()
    def theirs():
        got["reference"] = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                       pad_token_id=0, eos_token_id=None)

    label = f"generate {shape} b{batch}" + ("" if weights == "fp32" else f" {weights}")
    times = alternate({"pretune": ours, "reference": theirs}, rounds, warmup, progress, label)
    a, b = got["pretune"][:, prompt:], got["reference"][:, prompt:]
    agree = float((a == b).float().mean()) if a.shape == b.shape else 0.0
    # bytes a token reads: the weights (the position table and one embedding row aside, all of them)
    # and, on average over the decode, half the KV cache of prompt + new_tokens positions
    act = torch.empty(0, dtype=cache_dtype(model)).element_size()  # the cache's (quantize.cache_dtype)
    kv = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * (prompt + new_tokens / 2) * act * batch
    pe = model.position_module if cfg.position == "learned" else None  # one row of W_p read per token
    per_token = resident_bytes(model) - (resident_bytes(pe) if pe is not None else 0) + kv
    bw = memory_bandwidth()
    r = _result("generate", shape, {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "weights": weights},
                times, batch * new_tokens, "tokens_per_s", rounds, warmup,
                target_key=("generate", shape, batch, weights), same_tokens_fraction=agree)
    roof = bw / per_token * batch
    r.update(bytes_per_token=per_token, bandwidth_gb_s=bw / 1e9, roofline_tokens_per_s=roof,
             fraction_of_roofline=r["pretune"]["tokens_per_s"] / roof)
    return r


def memory_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large copy (read + write, as STREAM's copy counts them): the DRAM bound."""
    src = torch.ones(mb << 18)  # mb MiB of float32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def _corpus_text(max_bytes: int) -> list[str]:
    """Documents of the built-in corpus (the King James Bible's chapters), up to max_bytes."""
    from pretune.data.sources import bible

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

    from pretune.data.tokenizers import load_tokenizer

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

    from pretune.data.loaders import LMBatches, Shard
    from pretune.data.prepare import prepare

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
