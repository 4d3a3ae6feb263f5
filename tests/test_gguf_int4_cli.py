"""`pretune import gguf:FILE --weights int4`: a Q4_1 (or Q4_0) file's blocks kept in the run as int4 packs
(models/packed.py), loaded by generate / evaluate / serve without an fp32 model.

The file is a tiny Llama GGUF written here with the `gguf` package's own Q4_1 quantizer, so the
reference is independent of pretune: the packs' nibbles are the file's raw block bytes, read by
hand (ggml's block_q4_1), and the model is the one `quantize_model(load_gguf(path), "int4")` builds
from the dequantized fp32 import (tests/test_quantize.py checks that path against hand-built
dequantized weights). The SmolLM2 figures are in docs/interop.md (benchmarks/gguf_int4_load.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretune.cli import main

gguf = pytest.importorskip("gguf")

D, FF, VOCAB = 64, 128, 150  # padded vocab 192: no block matrix has as many rows (quantize_model takes such a one for the head)


def write_q4_1_gguf(path: Path, matrices: str = "Q4_1", seed: int = 0) -> Path:
    """A one-block Llama GGUF (d 64, 2 heads of 32, 1 KV head, d_ff 128): its block matrices in
    `matrices` (Q4_1 or F32), the token embedding Q8_0 and the norms F32, as llama.cpp writes a Q4_1 file."""
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-q4")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x41 + i) for i in range(VOCAB - 1)] + ["<|endoftext|>"])
    w.add_token_types([1] * (VOCAB - 1) + [3])  # llama.cpp's NORMAL, and CONTROL for the end of text
    w.add_eos_token_id(VOCAB - 1)
    w.add_token_merges([])

    def add(name, shape, kind, scale=0.2):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if kind == "F32":
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qt[kind]), raw_dtype=qt[kind])

    add("token_embd.weight", (VOCAB, D), "Q8_0", 1.0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    for n, s in [("attn_q", (D, D)), ("attn_k", (32, D)), ("attn_v", (32, D)), ("attn_output", (D, D)),
                 ("ffn_gate", (FF, D)), ("ffn_up", (FF, D)), ("ffn_down", (D, FF))]:
        add(f"blk.0.{n}.weight", s, matrices)
    for n in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{n}.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(GGUF path, the int4 run, the fp32 run), both made through the command line."""
    root = tmp_path_factory.mktemp("gguf4")
    f = write_q4_1_gguf(root / "tiny.Q4_1.gguf")
    assert main(["import", f"gguf:{f}", "--weights", "int4", "--out", str(root / "int4")]) == 0
    assert main(["import", f"gguf:{f}", "--out", str(root / "fp32")]) == 0
    return f, root / "int4", root / "fp32"


def _raw_nibbles(path: Path, name: str) -> np.ndarray:
    """q (N, K) of a Q4_1 tensor from its bytes: blocks of fp16 d, fp16 m, 16 bytes whose low nibbles
    are weights 0..15 of the block and high nibbles 16..31 (ggml-common.h block_q4_1)."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    assert t.tensor_type.name == "Q4_1"
    raw = np.asarray(t.data).reshape(-1, 20)[:, 4:]
    return np.concatenate([raw & 0x0F, raw >> 4], axis=1).reshape(int(t.shape[1]), int(t.shape[0]))


def test_the_run_keeps_the_files_blocks_and_says_so(runs):
    from safetensors import safe_open

    f, r4, _ = runs
    cfg = json.loads((r4 / "run.json").read_text())
    assert cfg["weights"] == "int4" and cfg["source"]["weights"] == "int4"
    with safe_open(str(r4 / "checkpoints" / "step-000000" / "model.safetensors"), "pt") as s:
        assert s.metadata() == {"format": "pretune-int4/1", "weights": "int4"}
        packed = s.get_tensor("blocks.0.mlp.proj.qweight")  # ffn_down: no rotary row permutation
        v = s.get_tensor("blocks.0.attn.qkv.qweight")[D + 32:]  # attn_v: the rows after q and k
    for got, name in [(packed, "blk.0.ffn_down.weight"), (v, "blk.0.attn_v.weight")]:
        q = torch.stack([got & 0x0F, got >> 4], -1).reshape(got.shape[0], -1)
        assert np.array_equal(q.numpy(), _raw_nibbles(f, name))


def test_int4_run_is_quantize_model_of_the_fp32_import_bit_for_bit(runs):
    from pretune.interop.gguf import load_gguf
    from pretune.models import quantize as Q
    from pretune.models.load import load_model

    f, r4, r32 = runs
    model, cfg, tok = load_model(r4, weights="int4")
    fp32 = load_gguf(f)[0]
    ref = Q.quantize_model(load_gguf(f)[0], "int4")
    a, b = model.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.tensor([tok.encode("ABCDEFGHIJ")])
    with torch.inference_mode():
        assert torch.equal(model.logits(model(ids)), ref.logits(ref(ids)))
    assert Q.weights_of(model) == "int4" and load_model(r4, weights=None)[0].weights_kind == "int4"
    # a tiny model is mostly its int8 embedding; at SmolLM2's size the packs are 18% (docs/interop.md)
    assert Q.resident_bytes(model) <= 0.35 * Q.resident_bytes(fp32)
    assert not any(t.dtype == torch.float32 for t in a.values())  # no fp32 weight held (rotary tables aside)


def test_a_q4_0_file_keeps_its_blocks_where_rounding_at_load_would_round_again(tmp_path, capsys):
    """Q4_0 (x = d (q - 8), no minimum): the packs hold the file's own nibbles and, to the bf16 of
    d, gguf's own dequantized weights; quantize_model's min/max groups of those floats would not."""
    from gguf.quants import dequantize
    from safetensors import safe_open

    from pretune.models import quantize as Q

    f = write_q4_1_gguf(tmp_path / "tiny.Q4_0.gguf", matrices="Q4_0", seed=3)
    assert main(["import", f"gguf:{f}", "--weights", "int4", "--out", str(tmp_path / "int4")]) == 0
    t = next(t for t in gguf.GGUFReader(str(f)).tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name == "Q4_0"
    ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(D, FF))
    raw = np.asarray(t.data).reshape(-1, 18)[:, 2:]  # block_q4_0: fp16 d, then 16 bytes of nibbles
    nibbles = np.concatenate([raw & 0x0F, raw >> 4], axis=1).reshape(D, FF)
    with safe_open(str(tmp_path / "int4" / "checkpoints" / "step-000000" / "model.safetensors"), "pt") as s:
        q2, sc, ze = (s.get_tensor(f"blocks.0.mlp.proj.{k}") for k in ("qweight", "scales", "zeros"))
    q = torch.stack([q2 & 0x0F, q2 >> 4], -1).reshape(D, FF)
    assert np.array_equal(q.numpy(), nibbles) and not ze.float().any()
    got = (q.float() - 8) * sc.float().repeat_interleave(32, 1) + ze.float().repeat_interleave(32, 1)
    d = ref.abs().reshape(D, -1, 32).amax(-1).repeat_interleave(32, 1) / 8  # |d| of each block
    assert ((got - ref).abs() <= 8 * d * 2.0 ** -8 + 1e-7).all()  # bf16 rounding of d: 2^-9 relative
    again = Q.dequantize_int4(*Q.int4_groups(ref))  # Q4_1's min/max groups would round it again,
    assert (again - ref).abs().max() > 10 * (got - ref).abs().max()
    # so `--weights int4` on the fp32 import finds the Q4_0 grid: the same model, bit for bit
    assert main(["import", f"gguf:{f}", "--out", str(tmp_path / "fp32")]) == 0
    from pretune.models.load import load_model
    a = load_model(tmp_path / "int4", weights="int4")[0].state_dict()
    b = load_model(tmp_path / "fp32", weights="int4")[0].state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["generate", "ABC", "--run", str(tmp_path / "int4"), "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0 and capsys.readouterr().out.startswith("ABC")


def test_generate_evaluate_and_serve_run_the_packs_as_the_fp32_run_quantized(runs, tmp_path, capsys):
    f, r4, r32 = runs
    out = {}
    # the int4 run with the verbs' default --weights auto (its own packs), the fp32 run rounded at load
    for name, run, w in (("int4", r4, []), ("fp32", r32, ["--weights", "int4"]), ("fp32-auto", r32, [])):
        capsys.readouterr()
        assert main(["generate", "ABC", "--run", str(run), *w, "--max-new-tokens", "8", "--temperature", "0"]) == 0
        out[name] = capsys.readouterr().out
    assert out["int4"] == out["fp32"] and out["int4"].strip()
    capsys.readouterr()
    assert main(["generate", "ABC", "--run", str(r32), "--weights", "fp32", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert out["fp32-auto"] == capsys.readouterr().out  # a float run's auto is its fp32
    text = tmp_path / "held.txt"
    text.write_text("ABCDEFGH IJKLMNOP ABAB CDCD " * 8)
    ppl = {}
    for name, run, w in (("int4", r4, []), ("fp32", r32, ["--weights", "int4"])):
        j = tmp_path / f"{name}.json"
        assert main(["evaluate", "--run", str(run), *w, "--tasks", f"perplexity:{text}",
                     "--tasks.json", str(j)]) == 0
        ppl[name] = json.loads(j.read_text())
        assert ppl[name]["weights"] == "int4"  # what ran, not what was asked
    rows = [next(r for r in ppl[n]["results"] if "perplexity" in r)["perplexity"] for n in ("int4", "fp32")]
    assert rows[0] == rows[1]

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pretune.serve.api import create_app
    from pretune.serve.runs import load_runs
    loaded = load_runs([r4])  # auto: the run's own int4 packs
    with TestClient(create_app(loaded, max_batch=4, gather_s=0.05)) as c:
        got = c.post("/api/generate", json={"run": r4.name, "prompt": "ABC", "max_new_tokens": 8,
                                            "temperature": 0.0}).json()
    assert "ABC" + got["text"] == out["int4"].rstrip("\n")  # the command prints the prompt too


def _one_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    f, r4, r32 = runs
    floats = write_q4_1_gguf(tmp_path / "f32.gguf", matrices="F32")
    err = _one_line(capsys, ["import", f"gguf:{floats}", "--weights", "int4", "--out", str(tmp_path / "a")])
    assert "keeps a file's Q4_0 or Q4_1 blocks" in err and "F32" in err and not (tmp_path / "a").exists()
    err = _one_line(capsys, ["import", f"hf:{tmp_path}", "--weights", "int4", "--out", str(tmp_path / "b")])
    assert "a hf: source holds floats" in err
    err = _one_line(capsys, ["import", f"gguf:{f}", "--weights", "int8", "--out", str(tmp_path / "c")])
    assert "is not kept in a run" in err
    err = _one_line(capsys, ["generate", "AB", "--run", str(r4), "--weights", "fp32"])
    assert "the run holds int4 weights" in err and "pass --weights int4 to generate" in err
    err = _one_line(capsys, ["export", str(r4), "--out", str(tmp_path / "hf")])
    assert "the run holds int4 weights" in err and "to fine-tune or export it" in err
    assert not (tmp_path / "hf").exists()
    err = _one_line(capsys, ["finetune", "--init", str(r4), "--task", "movie-sentiment", "--out", str(tmp_path / "ft")])
    assert "the run holds int4 weights" in err and not (tmp_path / "ft").exists()
    err = _one_line(capsys, ["generate", "AB", "--run", str(r4), "--weights", "int8"])
    assert "not the floats --weights int8 needs" in err
