"""LoRA: low-rank adapters on a frozen body (Hu et al. 2021, eq. 3).

    h = W_0 x + (alpha / r) * B A dropout(x),   A: (r, in), B: (out, r)

A starts as nn.Linear's (Kaiming-uniform), B at zero, so an adapted model starts as its base
(Hu et al. 2021, sec. 4.1; peft's defaults). pretune fuses q, k and v into one matrix (and a
SwiGLU MLP's gate and up into `fc`), so one `LoRALinear` carries an adapter per *segment* of the
fused output rows: adapting q and v of `qkv` is exactly adapting `q_proj` and `v_proj` of the
Hugging Face layout (tests/test_lora.py checks it against the `peft` library).

Targets: q, k, v (attention's fused qkv), o (its output projection), gate, up (the MLP's first
matrix: [gate; up] for SwiGLU, the whole of it for GELU), down (the MLP's second matrix). A routed
(MoE) block's experts are refused: their weights are (E, ., .) tensors, not one Linear.

`LoRALinear` keeps the base's parameters under their own names (`weight`, `bias`), so the
state-dict keys of the body do not change and a checkpoint loads as before; the adapters are
`lora_A.<target>` and `lora_B.<target>`. `merge_lora` folds B A into W and puts plain `nn.Linear`s
back (for export and for speed). The adapter file (`save_adapter`) is a small safetensors file:
the adapters and the classification head, with the base's checksum, rank, alpha, dropout and
targets in its metadata; `load_adapter` refuses it on any other base.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PretuneError


TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# "all": every matrix of a block (gate only in SwiGLU; a routed block's attention only). Hu et al. 2021
# (sec. 7.1) adapt W_q and W_v over many epochs; on a short budget adapting every linear layer is what
# matches full fine-tuning (Dettmers et al. 2023, QLoRA, sec. 4), and measured here: MiniLM,
# movie-sentiment, 1,000 labels, 2 epochs, seed 0: q,v 74.3% against full fine-tuning's 80.9%
# (docs/finetuning.md, "LoRA against full fine-tuning").
DEFAULT_TARGETS = "all"
DEFAULT_RANK = 8      # Hu et al. 2021, Table 9 (RoBERTa/DeBERTa on GLUE): r = 8
DEFAULT_ALPHA = 16.0  # scale alpha / r = 2, as peft's examples; Hu et al. tune alpha once and keep it
DEFAULT_DROPOUT = 0.05
# LoRA trains far fewer parameters and needs a larger step than full fine-tuning: Hu et al. 2021,
# Table 9 use 4e-4 .. 5e-4 on RoBERTa-base; used when --train.lr is not given, but where a LoRA size
# band was measured (tasks/config.py: MEASURED_BANDS)
DEFAULT_LR = 5e-4
FORMAT = "pretune-lora"


def _keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout's keep-mask (bool), drawn from its own seed: the same in forward and backward."""
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    return torch.empty(x.shape, device=x.device, dtype=torch.bool).bernoulli_(1 - p, generator=g)


class _DropProject(torch.autograd.Function):
    """h = dropout(x) A^T, saving only x and a seed for backward. Autograd's own composition saves
    dropout's float mask and the dropped copy of x besides (8 bytes per element of x, against 4
    here, and x is often saved by its neighbours already); with the base frozen, those were a
    third of LoRA's activation memory (docs/finetuning.md, "Peak memory"). The mask is drawn
    again in backward from the seed."""

    @staticmethod
    def forward(ctx, x, A, p: float, seed: int):
        ctx.save_for_backward(x, A)
        ctx.p, ctx.seed = p, seed
        return F.linear((x * _keep(x, p, seed)).mul_(1 / (1 - p)), A)

    @staticmethod
    def backward(ctx, gh):
        x, A = ctx.saved_tensors
        keep, k = _keep(x, ctx.p, ctx.seed), 1 / (1 - ctx.p)
        gx = gA = None
        if ctx.needs_input_grad[1]:  # dA = gh^T dropout(x); the dropped copy lives only here
            xd = (x * keep).mul_(k).reshape(-1, x.shape[-1])
            gA = (gh.reshape(-1, gh.shape[-1]).to(xd.dtype).t() @ xd).to(A.dtype)
            del xd
        if ctx.needs_input_grad[0]:  # dx = (gh A) * keep / (1 - p)
            gx = (gh.to(A.dtype) @ A).mul_(keep).mul_(k).to(x.dtype)
        return gx, gA, None, None


class LoRALinear(nn.Module):
    """nn.Linear's y = x W^T + b plus one low-rank update per segment of the output rows."""

    def __init__(self, base: nn.Linear, segments: dict[str, tuple[int, int]], rank: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        for k, v in vars(base).items():  # e.g. residual_scale, read by the initialisation
            if not k.startswith("_") and k not in ("in_features", "out_features", "training"):
                setattr(self, k, v)
        self.segments = dict(segments)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (s, e) in self.segments.items():
            A = torch.empty(rank, self.in_features, device=dev, dtype=dt)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's (and peft's) init of A
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(e - s, rank, device=dev, dtype=dt))
        self.p = float(dropout)
        self.merged = False

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A for every segment, as one (out, in) matrix."""
        d = torch.zeros_like(self.weight)
        for name, (s, e) in self.segments.items():
            d[s:e] = self.scale * (self.lora_B[name] @ self.lora_A[name])
        return d

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        names = list(self.segments)
        A = torch.cat([self.lora_A[n] for n in names]) if len(names) > 1 else self.lora_A[names[0]]
        p = self.p if self.training else 0.0
        if p > 0 and torch.is_grad_enabled():
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from torch's generator: a seeded run repeats
            h = _DropProject.apply(x, A, p, seed)
        else:
            h = F.linear(F.dropout(x, p, True) if p > 0 else x, A)
        # the update as one tensor over all output rows (zeros between the segments), added once:
        # slicing y in place would make backward clone its gradient per adapted matrix
        pieces, at = [], 0
        for i, n in sorted(enumerate(names), key=lambda t: self.segments[t[1]][0]):
            s, e = self.segments[n]
            if s > at:
                pieces.append(h.new_zeros(*h.shape[:-1], s - at))
            pieces.append(F.linear(h[..., i * self.rank:(i + 1) * self.rank], self.lora_B[n]))
            at = e
        if at < self.out_features:
            pieces.append(h.new_zeros(*h.shape[:-1], self.out_features - at))
        return y + (torch.cat(pieces, -1) if len(pieces) > 1 else pieces[0]).mul_(self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta()
            self.merged = False


def parse_targets(spec) -> list[str]:
    if spec == "all" or spec == ["all"]:
        return ["all"]
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise PretuneError("no LoRA target modules given", None, f"name some of {', '.join(TARGETS)}")
    for t in names:
        if t not in TARGETS:
            near = difflib.get_close_matches(t, TARGETS, n=1)
            raise PretuneError(f"unknown LoRA target module '{t}'", None,
                               (f"did you mean '{near[0]}'? " if near else "") + f"use some of {', '.join(TARGETS)}")
    return list(dict.fromkeys(names))


def _sites(block, c, targets: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """attribute path inside the block -> {target: (first row, end row)} for the targets asked."""
    if targets == ["all"]:
        targets = ["q", "k", "v", "o"] + ([] if getattr(block, "routed", False) else
                                          (["gate"] if block.mlp.glu else []) + ["up", "down"])
    q, kv = c.n_head * c.head_dim, c.kv_heads * c.head_dim
    rows = {"q": ("attn.qkv", (0, q)), "k": ("attn.qkv", (q, q + kv)), "v": ("attn.qkv", (q + kv, q + 2 * kv)),
            "o": ("attn.proj", (0, c.d_model))}
    mlp = [t for t in targets if t in ("gate", "up", "down")]
    if mlp and getattr(block, "routed", False):
        raise PretuneError(f"LoRA cannot adapt a mixture-of-experts block's experts ({', '.join(mlp)})", None,
                           "target the attention only, e.g. --finetune.lora-targets q,k,v,o")
    if mlp:
        f = block.mlp.fc.out_features
        if block.mlp.glu:
            rows.update(gate=("mlp.fc", (0, f // 2)), up=("mlp.fc", (f // 2, f)))
        else:
            rows["up"] = ("mlp.fc", (0, f))
        rows["down"] = ("mlp.proj", (0, c.d_model))
    out: dict[str, dict] = {}
    for t in targets:
        if t not in rows:
            raise PretuneError(f"a {c.mlp} MLP has no '{t}' matrix to adapt", None,
                               "use up and down for a GELU MLP (gate is SwiGLU's)")
        path, r = rows[t]
        out.setdefault(path, {})[t] = r
    return out


def apply_lora(body: nn.Module, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
               dropout: float = DEFAULT_DROPOUT, targets=DEFAULT_TARGETS) -> dict:
    """Wrap the target matrices of every block of `body` (a Transformer) in `LoRALinear` and freeze
    everything else of the body. Returns the adapter's settings (as the adapter file records them)."""
    targets = parse_targets(targets)
    if not isinstance(rank, int) or rank <= 0:
        raise PretuneError(f"LoRA rank {rank} must be a positive integer", None, "e.g. --finetune.lora-rank 8")
    if not alpha > 0 or not 0 <= dropout < 1:
        raise PretuneError(f"LoRA alpha {alpha} must be > 0 and dropout {dropout} in [0, 1)", None,
                           "e.g. --finetune.lora-alpha 16 --finetune.lora-dropout 0.05")
    c = body.config
    for prm in body.parameters():
        prm.requires_grad_(False)
    used: list[str] = []
    for block in body.blocks:
        sites = _sites(block, c, targets)
        used += [t for segs in sites.values() for t in segs if t not in used]
        for path, segs in sites.items():
            parent_name, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, leaf)
            if isinstance(lin, LoRALinear):
                raise PretuneError("the model already carries LoRA adapters", None, "merge them first (merge_lora)")
            widest = max(e - s for s, e in segs.values())
            if rank > min(lin.in_features, widest):
                raise PretuneError(f"LoRA rank {rank} is above the width of the layer it adapts "
                                   f"({min(lin.in_features, widest)})", None,
                                   f"use a rank of 1 .. {min(lin.in_features, widest)}")
            setattr(parent, leaf, LoRALinear(lin, segs, rank, float(alpha), dropout))
    return {"rank": rank, "alpha": float(alpha), "dropout": dropout, "targets": targets,
            "adapted": [t for t in TARGETS if t in used]}  # "all" resolved: what was adapted


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base matrix and put a plain nn.Linear back; the number merged."""
    found = lora_modules(model)
    for name, m in found:
        m.merge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                        dtype=m.weight.dtype)
        lin.weight = m.weight
        if m.bias is not None:
            lin.bias = m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, lin)
    return len(found)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters and the classification head (what trains under LoRA), by state-dict key."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k or k.startswith("head.")}


def save_adapter(model: nn.Module, path: str | Path, settings: dict, base_sha256: str | None,
                 extra: dict | None = None) -> Path:
    """The adapter file: safetensors, its metadata naming the base by checksum (atomic write)."""
    from safetensors.torch import save

    from ..fileio import atomic_write_bytes
    meta = {"format": FORMAT, "base_sha256": base_sha256 or "", "rank": str(settings["rank"]),
            "alpha": str(settings["alpha"]), "dropout": str(settings["dropout"]),
            "targets": ",".join(settings["targets"]), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    atomic_write_bytes(path, save(adapter_state(model), metadata=meta))
    return Path(path)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an adapter file; one line if it is not one."""
    from safetensors import SafetensorError, safe_open

    from ..safety import check_safetensors
    p = Path(path)
    if not p.is_file():
        raise PretuneError("no such adapter file", str(p), "give the adapter.safetensors of a LoRA fine-tuned run")
    check_safetensors(p)
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PretuneError(f"cannot read the adapter: {e}", str(p), "the file is damaged") from e
    if meta.get("format") != FORMAT:
        raise PretuneError("not a pretune LoRA adapter (its metadata has no format 'pretune-lora')", str(p),
                           "give the adapter.safetensors of a LoRA fine-tuned run")
    settings = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "dropout": float(meta["dropout"]),
                "targets": meta["targets"].split(","), "base_sha256": meta.get("base_sha256") or None}
    return tensors, settings


def check_base(settings: dict, base_sha256: str | None, where: str) -> None:
    """An adapter loads only on the weights it was trained on."""
    want = settings.get("base_sha256")
    if want and want != base_sha256:
        raise PretuneError(f"the adapter was trained on another base (its weights' SHA-256 {want[:12]}..., "
                           f"this one's {str(base_sha256)[:12]}...)", where,
                           "give --init the run the adapter was trained on (its run.json: finetune.init)")


def load_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy an adapter file's tensors into a model already wrapped by `apply_lora` with its settings."""
    sd = model.state_dict()
    bad = sorted(k for k in tensors if k not in sd or sd[k].shape != tensors[k].shape)
    if bad:
        raise PretuneError(f"the adapter does not fit the model ({bad[0]})", None,
                           "use the adapter with the base and the task it was trained on")
    with torch.no_grad():
        for k, v in tensors.items():
            sd[k].copy_(v)
