"""LoRA (models/lora.py) against the `peft` library on pretune's own Hugging Face export: the same
weights, the same non-zero A and B on both sides (peft's B = 0 would make the check trivial),
dropout 0; the forward pass, the gradients and one AdamW step agree within 1e-5. Also: merging,
the adapter file and its refusal on another base."""

import pytest
import torch

from pretune.config.model import ModelConfig
from pretune.errors import PretuneError
from pretune.models.lora import (LoRALinear, apply_lora, check_base, load_adapter, lora_modules, merge_lora,
                                 read_adapter, save_adapter)
from pretune.models.transformer import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _small(**kw):
    return ModelConfig(**{**dict(name="small", vocab_size=300, max_seq_len=32, n_layer=2, n_head=4, d_model=32,
                                 dropout=0.0, lm_head=False), **kw})


_BERT = dict(causal=False, norm_placement="post", embedding_norm=True, mlp="gelu", type_vocab_size=2,
             norm_eps=1e-12, tokenizer="bert-uncased")
_LLAMA = dict(norm="rmsnorm", position="rotary", mlp="swiglu", bias=False, n_kv_head=2, d_ff=48, rope_theta=500.0)
# (config, HF class, our targets, peft's module names, the HF prefix of layer i)
CASES = {
    "llama-qkv": (_small(**_LLAMA), "LlamaModel", "q,k,v", ["q_proj", "k_proj", "v_proj"]),
    "llama-all": (_small(**_LLAMA), "LlamaModel", "q,k,v,o,gate,up,down",
                  ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "bert-qkv": (_small(**_BERT), "BertModel", "q,k,v", ["query", "key", "value"]),
}
# our target -> the HF module (relative to a layer) peft wraps
HF_NAME = {"llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
           "bert": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                    "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}}
PATHS = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj", "gate": "mlp.fc", "up": "mlp.fc",
         "down": "mlp.proj"}


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_matches_peft_forward_gradients_and_one_step(case, tmp_path):
    from pretune.interop.hf_weights import export_hf
    c, cls, targets, peft_targets = CASES[case]
    fam = "llama" if cls.startswith("Llama") else "bert"
    ours = _randomize(Transformer(c))
    out = export_hf(ours, None, tmp_path / "hf")
    ref = getattr(transformers, cls).from_pretrained(str(out), attn_implementation="eager")
    settings = apply_lora(ours, rank=4, alpha=8.0, dropout=0.0, targets=targets)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=peft_targets))
    layers = ref.base_model.model.layers if fam == "llama" else ref.base_model.model.encoder.layer
    g = torch.Generator().manual_seed(1)
    pairs = []  # (our A, our B, peft's A, peft's B)
    for i, block in enumerate(ours.blocks):
        for t in settings["targets"]:
            m = block.get_submodule(PATHS[t])
            theirs = layers[i].get_submodule(HF_NAME[fam][t])
            A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
            with torch.no_grad():
                A.copy_(torch.randn(A.shape, generator=g) * 0.3)
                B.copy_(torch.randn(B.shape, generator=g) * 0.3)
                m.lora_A[t].copy_(A)
                m.lora_B[t].copy_(B)
            pairs.append((m.lora_A[t], m.lora_B[t], A, B))
    assert len(pairs) == c.n_layer * len(settings["targets"])
    # float64 on both sides: the check is then of the mapping, not of float32's rounding order
    ours.double(), ref.double()
    ours.train(), ref.train()  # dropout is 0 everywhere: train mode changes nothing but must not differ
    ids = torch.randint(0, c.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    kw = {"token_type_ids": torch.randint(0, 2, ids.shape)} if fam == "bert" else {}
    h = ours(ids, segment_ids=kw.get("token_type_ids"), attention_mask=mask.bool())
    r = ref(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    real = mask.bool()
    assert (h[real] - r[real]).abs().max().item() <= 1e-5
    w = torch.randn(h.shape, generator=g, dtype=torch.float64)
    n = real.sum()  # a mean per token: gradients of order 1, so 1e-5 is float32's rounding, not luck
    ((h[real] * w[real]).sum() / n).backward()
    ((r[real] * w[real]).sum() / n).backward()
    for a, b, A, B in pairs:
        assert (a.grad - A.grad).abs().max().item() <= 1e-5
        assert (b.grad - B.grad).abs().max().item() <= 1e-5
    # only the adapters train: the base has no gradient on our side
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for g_ in opt_ours.param_groups for p in g_["params"]) == \
        sum(p.numel() for g_ in opt_ref.param_groups for p in g_["params"])
    opt_ours.step(), opt_ref.step()
    for a, b, A, B in pairs:
        assert (a - A).abs().max().item() <= 1e-5 and (b - B).abs().max().item() <= 1e-5


def test_merge_gives_the_same_outputs_and_plain_linears():
    c = _small(**_LLAMA)
    m = _randomize(Transformer(c)).eval()
    apply_lora(m, rank=2, alpha=4.0, dropout=0.0, targets="q,v,o,down")
    with torch.no_grad():
        for _, lin in lora_modules(m):
            for t in lin.lora_B:
                lin.lora_B[t].normal_(0, 0.2)
    ids = torch.randint(0, c.vocab_size, (2, 10))
    with torch.no_grad():
        before = m(ids)
        lin = m.blocks[0].attn.qkv
        lin.merge()
        assert torch.allclose(m(ids), before, atol=1e-5)
        lin.unmerge()
        assert torch.allclose(m(ids), before, atol=1e-6)
        assert merge_lora(m) == 3 * c.n_layer  # qkv, proj, mlp.proj per block
        assert not lora_modules(m) and type(m.blocks[0].attn.qkv) is torch.nn.Linear
        assert torch.allclose(m(ids), before, atol=1e-5)
        assert not any(".lora_" in k for k in m.state_dict())


def test_the_adapter_file_records_its_base_and_refuses_another(tmp_path):
    c = _small(**_LLAMA)
    m = Transformer(c)
    s = apply_lora(m, rank=3, alpha=6.0, dropout=0.1, targets="k,up")
    with torch.no_grad():
        m.blocks[1].mlp.fc.lora_B["up"].fill_(0.5)
    p = save_adapter(m, tmp_path / "adapter.safetensors", s, "ab" * 32)
    assert p.stat().st_size < 20_000
    tensors, meta = read_adapter(p)
    assert meta == {"rank": 3, "alpha": 6.0, "dropout": 0.1, "targets": ["k", "up"], "base_sha256": "ab" * 32}
    other = Transformer(c)
    apply_lora(other, **{k: meta[k] for k in ("rank", "alpha", "dropout", "targets")})
    check_base(meta, "ab" * 32, "here")
    load_adapter(other, tensors)
    assert torch.equal(other.blocks[1].mlp.fc.lora_B["up"], m.blocks[1].mlp.fc.lora_B["up"])
    with pytest.raises(PretuneError, match="another base"):
        check_base(meta, "cd" * 32, "here")


@pytest.mark.parametrize("kw, words", [
    (dict(rank=0), "positive integer"),
    (dict(rank=33), "above the width"),
    (dict(targets="q,kv"), "unknown LoRA target module 'kv'"),
    (dict(targets="gate"), "has no 'gate'"),
])
def test_bad_lora_settings_are_one_line(kw, words):
    with pytest.raises(PretuneError, match=words):
        apply_lora(Transformer(_small(**_BERT)), **kw)


def test_moe_experts_are_refused_as_targets_but_attention_is_adapted():
    c = _small(n_expert=4, top_k=2)
    with pytest.raises(PretuneError, match="mixture-of-experts"):
        apply_lora(Transformer(c), targets="q,up")
    m = Transformer(c)
    apply_lora(m, targets="q,o")
    assert isinstance(m.blocks[0].attn.qkv, LoRALinear)


def test_all_targets_every_matrix_of_a_block_and_only_attention_of_a_routed_one():
    assert apply_lora(Transformer(_small(**_LLAMA)))["adapted"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert apply_lora(Transformer(_small(**_BERT)))["adapted"] == ["q", "k", "v", "o", "up", "down"]
    m = Transformer(_small(n_expert=4, top_k=2))
    assert apply_lora(m, targets="all")["adapted"] == ["q", "k", "v", "o"]


def test_dropout_adapter_gradients_match_finite_differences():
    """The adapter's dropout path (a hand-written backward that draws its mask again from a seed)
    against torch.autograd.gradcheck's finite differences, in float64, and the mask is dropout's."""
    from pretune.models.lora import _DropProject
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A: _DropProject.apply(x, A, 0.3, 1234), (x, A))
    h = _DropProject.apply(x, A, 0.5, 7)
    # each x element is either dropped or scaled by 2: recover the mask from one-hot A rows
    xd = _DropProject.apply(x, torch.eye(6, dtype=torch.float64), 0.5, 7)
    assert set(torch.unique((xd / x).round(decimals=6)).tolist()) <= {0.0, 2.0}
    assert torch.allclose(h, xd @ A.t())


def _saved_bytes(module, saved: dict):
    """Saved-tensor hooks that record, by storage, the bytes autograd keeps for backward, the
    module's own parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)



def test_an_adapted_matrix_saves_one_copy_of_its_input_for_backward():
    """Peak memory: with the base frozen and dropout on, backward keeps x itself (and the small
    rank-r projections), not dropout's float mask and a dropped copy besides (docs/finetuning.md)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    lin.requires_grad_(False)
    m = LoRALinear(lin, {"q": (0, 32), "k": (32, 64), "v": (64, 96)}, rank=4, alpha=8.0, dropout=0.1)
    x = torch.randn(8, 16, 64, requires_grad=True)
    saved = {}
    with _saved_bytes(m, saved):
        y = m(x)
    small = 8 * 16 * 12 * 4 + 12 * 64 * 4  # the (tokens, 3r) projection and q,k,v's A stacked
    assert sum(saved.values()) <= x.numel() * 4 + small
    y.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.lora_A.values())


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_activation_checkpointing_under_lora_same_loss_and_gradients_fewer_saved_tensors(family):
    """--train.activation-checkpointing in a LoRA fine-tuning (training/memory.py's checkpoint_blocks):
    with the body's dropout and the adapters' on, the loss and every adapter gradient equal those
    without it (the recomputation replays the RNG, so it draws the same masks, the adapters' seeds
    included), and what backward keeps (saved-tensor hooks, plus the block inputs the checkpoints
    hold) is under half."""
    from pretune.objectives.registry import pretrain_loss
    from pretune.training.memory import checkpoint_blocks
    kw = dict(dropout=0.1, lm_head=True, n_layer=3)
    cfg = _small(**kw) if family == "gpt" else _small(**_BERT, **kw, nsp_head=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, 300, (4, 25), generator=g)
    if family == "gpt":
        batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    else:
        labels = torch.full((4, 24), -100)
        labels[:, 3:9] = x[:, 3:9]
        batch = {"input_ids": x[:, :-1], "attention_mask": torch.ones(4, 24, dtype=torch.bool), "labels": labels,
                 "segment_ids": torch.zeros(4, 24, dtype=torch.long)}
    out = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        m = _randomize(Transformer(cfg)).train()
        apply_lora(m, rank=4, alpha=8.0, dropout=0.2, targets="all")
        for _, mod in lora_modules(m):  # non-zero B: the adapters' gradients reach A and the body's input
            torch.nn.init.normal_(next(iter(mod.lora_B.values())), std=0.1)
        if ckpt:
            assert checkpoint_blocks(m) == 3
        saved = {}
        torch.manual_seed(2)
        with _saved_bytes(m, saved):
            loss, _ = pretrain_loss(m, batch)
        loss.backward()
        kept = sum(saved.values()) + (3 * 4 * 24 * cfg.d_model * 4 if ckpt else 0)  # each block's input
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, kept))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert out[0][1] and out[0][1].keys() == out[1][1].keys()
    for n in out[0][1]:
        torch.testing.assert_close(out[0][1][n], out[1][1][n], msg=n)
    assert out[1][2] < 0.5 * out[0][2], (out[0][2], out[1][2])
