"""A routed feed-forward layer: a mixture of experts (Shazeer et al. 2017).

A linear router scores the E experts for each token x; the token goes to the
top k of them, and the layer's output is their gated sum

    p(x) = softmax(x W_r)                      router probabilities over all E experts
    S    = topk(p(x), k)                       the chosen experts
    g_i  = p_i / sum_{j in S} p_j  (k > 1)     gates: GShard's renormalised top-k = Mixtral's
    g_i  = p_i                     (k = 1)     softmax over the chosen logits; Switch for top-1
    y    = sum_{i in S} g_i E_i(x)  (+ E_shared(x))

Why this variant: softmax over the k chosen logits (Mixtral, Jiang et al. 2024,
sec. 2.1) is the same number as GShard's renormalised top-2 (Lepikhin et al.
2020, Algorithm 1) without its random second choice, it makes the gates sum to
1 so the layer's scale does not depend on the router's confidence, and it is
what `MixtralForCausalLM` computes, so a Llama-style MoE exports to it exactly.
With k = 1 the renormalised gate is identically 1 and the router would learn
from the balancing loss alone, so top-1 keeps Switch's raw probability (Fedus
et al. 2022, eq. 2), which lets the task loss reach the router.

Training signals, in `aux_loss` after each forward pass:

    balance = E * sum_i f_i P_i       Switch Transformer eq. 4: f_i the fraction of the
                                      N*k routing assignments that chose expert i, P_i the
                                      mean router probability of i (min 1, when uniform)
    z       = mean_x logsumexp(x W_r)^2   router z-loss (Zoph et al. 2022, ST-MoE eq. 5)
    aux_loss = aux_loss_coef * balance + z_loss_coef * z

f_i counts all k choices and is divided by N*k, so the balance term is 1 at
perfect balance for any k (as Megatron-Core normalises it; Hugging Face's
Mixtral loss divides by N only and is k times this).

Capacity (Switch sec. 2.2; GShard): with `capacity_factor` cf, each expert takes
at most C = ceil(cf * N * k / E) of the N*k assignments of a batch. Priority
goes to first choices over second choices (GShard), then to earlier tokens; an
assignment past C is dropped: it contributes zero, the residual connection
carries the token through unchanged, and the surviving gates are not
renormalised. `capacity_factor=None` is dropless: every assignment is computed.

Dispatch has no per-token loop. The N*k assignments are sorted by expert; the
groups fill E queues of C slots and all experts run as one batched matmul, or
(dropless, when the queues would be mostly padding) each expert runs once on
its contiguous group, a loop over the E experts. Moving rows to and from the
groups are (partial) permutations, whose gradients are gathers too.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.model import ModelConfig
from .layers import MLP, activation


class _Gather(torch.autograd.Function):
    """Rows `x[idx]` where `idx` reaches each row of x at most once: a permutation, or
    (partial=True) a partial one in which idx = len(x) yields a zero row. The gradient
    is the same kind of gather through the inverse map `inv` (len(y) where a row of x
    went nowhere): never the scatter-add of indexing's own backward, which took a
    third of the layer's time in a profile on a busy 2-core CPU."""

    @staticmethod
    def forward(ctx, x, idx, inv, partial: bool):
        ctx.save_for_backward(inv)
        ctx.partial = partial
        return _rows(x, idx, partial)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return _rows(g, inv, ctx.partial), None, None, None


def _rows(x, idx, partial):
    if partial:
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return x.index_select(0, idx)


class MoE(nn.Module):
    """Top-k routed experts in place of a block's dense MLP (see the module docstring).

    Two dispatch forms compute the same numbers. Batched: all experts in one (E, C, d)
    matmul, C the capacity or, dropless, the busiest expert's load; a few large kernels,
    but E*C - N*k padded rows of wasted work. Grouped: one matmul per expert on exactly
    its tokens; no waste, but E times more (smaller) kernels, which an oversubscribed
    CPU or a GPU's launch overhead punishes. Dropless routing uses the batched form
    while the padding is at most `max_padding` times the real work, grouped beyond.

    The E experts' weights are stacked, in `nn.Linear`'s (out, in) layout and the
    same fused [gate; up] order as `pretune.models.layers.MLP` and Hugging Face's
    `MixtralExperts` (gate_up_proj, down_proj):
        fc_weight   (E, F, d)   F = d_expert_ff, or 2 * d_expert_ff for SwiGLU
        proj_weight (E, d, d_expert_ff)
        fc_bias (E, F), proj_bias (E, d)   when the config has biases
    After each forward: `aux_loss` (scalar tensor) and `stats` (detached tensors:
    `expert_fraction` (E,), `dropped`, `entropy`)."""

    max_padding = 1.5  # dropless: batched while E * max_e load <= 1.5 * N * k

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.n_expert, self.top_k, self.capacity_factor = c.n_expert, c.top_k, c.capacity_factor
        d, ff = c.d_model, c.expert_ffn_dim
        self.glu = c.mlp == "swiglu"
        self.act = activation(c.mlp)
        self.router = nn.Linear(d, c.n_expert, bias=False)  # W_r
        self.fc_weight = nn.Parameter(torch.empty(c.n_expert, (2 if self.glu else 1) * ff, d))
        self.proj_weight = nn.Parameter(torch.empty(c.n_expert, d, ff))
        self.fc_bias = nn.Parameter(torch.empty(c.n_expert, self.fc_weight.shape[1])) if c.bias else None
        self.proj_bias = nn.Parameter(torch.empty(c.n_expert, d)) if c.bias else None
        # DeepSeekMoE's always-on shared expert (Dai et al. 2024): a dense MLP of d_ff beside the routed ones.
        self.shared = MLP(c) if c.shared_expert else None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}
        # Data parallelism (training/loop.py sets them): group_sum all-reduces a device tensor over
        # the ranks, so the balancing loss is over the group's micro-batch; group_weight 0 keeps a
        # stand-in micro-batch's tokens out of the counts.
        self.group_sum = None
        self.group_weight = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The family's init, as Transformer._init gives a dense MLP: N(0, 0.02), the residual (down)
        # projection scaled by 1/sqrt(2 n_layer) where the family does (GPT-2, Radford et al. 2019,
        # sec. 2.3; not GPT-1 or BERT). The model's `apply(_init)` sees only nn.Linear / nn.Embedding,
        # so the stacked tensors are done here.
        std = 0.02
        nn.init.normal_(self.router.weight, 0.0, std)
        nn.init.normal_(self.fc_weight, 0.0, std)
        nn.init.normal_(self.proj_weight, 0.0, std / math.sqrt(2 * self.c.n_layer) if self.c.residual_scaled else std)
        for b in (self.fc_bias, self.proj_bias):
            if b is not None:
                nn.init.zeros_(b)

    def capacity(self, n_tokens: int) -> int | None:
        """C = ceil(cf * N * k / E) assignments per expert, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_expert)

    def experts(self) -> list[tuple]:
        """Each expert's (W_fc, b_fc, W_proj, b_proj), as views of the stacked tensors.
        `unbind` once per forward pass: its backward stacks the E gradients in one
        allocation, where indexing `fc_weight[e]` E times would write E full-size
        zero gradients and add them up (1.1-1.4x slower on a 2-core CPU)."""
        none = [None] * self.n_expert
        return list(zip(self.fc_weight.unbind(0), self.fc_bias.unbind(0) if self.fc_bias is not None else none,
                        self.proj_weight.unbind(0), self.proj_bias.unbind(0) if self.proj_bias is not None else none))

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The activation between the two projections, as in `pretune.models.layers.MLP`: GELU, or SwiGLU's silu(gate) * up."""
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return self.act(h)

    def expert(self, x: torch.Tensor, w_fc, b_fc, w_proj, b_proj) -> torch.Tensor:
        """E_e(x) for a group of tokens x (n, d) routed to one expert."""
        return F.linear(self.hidden(F.linear(x, w_fc, b_fc)), w_proj, b_proj)

    def experts_batched(self, X: torch.Tensor) -> torch.Tensor:
        """E_e(X[e]) for all experts at once: X (E, C, d) -> (E, C, d), two batched matmuls."""
        h = X @ self.fc_weight.transpose(1, 2)
        if self.fc_bias is not None:
            h = h + self.fc_bias[:, None]
        y = self.hidden(h) @ self.proj_weight.transpose(1, 2)
        return y + self.proj_bias[:, None] if self.proj_bias is not None else y

    def route(self, x: torch.Tensor):
        """Router logits (N, E), probabilities (N, E), chosen experts (N, k) and their gates (N, k).
        In float32 (at least) whatever the autocast: the softmax and its exponent are where
        bf16 routing goes unstable (Switch sec. 2.4, "selective precision")."""
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dt), self.router.weight.to(dt))
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_p
        return logits, probs, top_i, gates

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """y for x (B, T, d). `token_mask` (B, T), True at real tokens (the model's attention_mask):
        padding is not routed, takes no expert's slot and counts in no statistic nor loss; it
        comes out zero (its residual carries it). The real tokens are routed as they would be
        alone, in order, without the padding."""
        B, T, d = x.shape
        xf = x.reshape(-1, d)
        if token_mask is None:
            return self._routed(xf).view(B, T, d)
        real = token_mask.reshape(-1).bool()
        idx = real.nonzero().squeeze(1)  # a host sync: the capacity counts the real tokens
        if idx.numel() == xf.shape[0]:
            return self._routed(xf).view(B, T, d)
        R = idx.numel()
        inv = torch.full((xf.shape[0],), R, device=x.device)  # token -> its row among the real ones; R = pad
        inv[idx] = torch.arange(R, device=x.device)
        y = self._routed(_Gather.apply(xf, idx, inv, True))
        return _Gather.apply(y, inv, idx, True).view(B, T, d)

    def _routed(self, xf: torch.Tensor) -> torch.Tensor:
        """The layer on N tokens xf (N, d); sets aux_loss and stats."""
        d = xf.shape[1]
        E, k = self.n_expert, self.top_k
        N = xf.shape[0]
        grouped_stats = self.group_sum is not None and self.training
        if N == 0:  # nothing but padding
            if grouped_stats:  # the other ranks' all-reduce still needs this one
                self.group_sum(torch.zeros(E + 1, device=xf.device))
            self.aux_loss = self.router.weight.sum() * 0.0
            zero = torch.zeros((), device=xf.device)
            self.stats = {"expert_fraction": torch.zeros(E, device=xf.device), "dropped": zero, "entropy": zero}
            return xf
        logits, probs, top_i, gates = self.route(xf)

        # The N*k assignments in priority order: every token's first choice, then every
        # second choice (GShard), each in token order; assignment j is token j mod N.
        # A stable sort by expert keeps that order inside each expert's queue.
        M = k * N
        expert_of = top_i.t().reshape(-1)  # (M,)
        order = torch.argsort(expert_of, stable=True)  # sorted position -> assignment
        arange = torch.arange(M, device=xf.device)
        inv = torch.empty_like(order).scatter_(0, order, arange)  # assignment -> sorted position
        counts = torch.bincount(expert_of, minlength=E)  # per expert, before capacity
        xk = xf.repeat(k, 1)  # (M, d): row j is token j mod N
        cap = self.capacity(N)
        grouped = False
        if cap is None:  # dropless: the busiest expert sets the queue length
            sizes = counts.tolist()  # the one host sync
            cap = max(sizes)
            grouped = E * cap > self.max_padding * M
        if grouped:
            # Each expert runs once on its contiguous group (MegaBlocks' grouped form, Gale
            # et al. 2022): exact work, a loop over E experts and none over tokens.
            xs = _Gather.apply(xk, order, inv, False)
            outs = [self.expert(xe, *w) for w, xe in zip(self.experts(), xs.split(sizes)) if xe.shape[0]]
            ys = _Gather.apply(torch.cat(outs), inv, order, False)
            dropped = torch.zeros((), device=xf.device)
        else:
            # E queues of C slots, filled in priority order, all experts in one batched matmul
            # (GShard's and Switch's dispatch). With a capacity the shapes are static: no host sync.
            start = counts.cumsum(0) - counts
            rank = (arange - start[expert_of[order]])[inv]  # place of assignment j in its expert's queue
            keep = rank < cap
            slot = torch.where(keep, expert_of * cap + rank, E * cap)  # assignment -> slot; E*C = dropped
            src = torch.full((E * cap + 1,), M, device=xf.device)  # slot -> assignment; M = empty
            src = src.scatter_(0, slot, arange)[:E * cap]  # (the dropped all land on the spare last entry)
            X = _Gather.apply(xk, src, slot, True).view(E, cap, d)
            ys = _Gather.apply(self.experts_batched(X).view(E * cap, d), slot, src, True)
            dropped = 1 - keep.float().mean()
        y = (ys.view(k, N, d) * gates.t().unsqueeze(-1)).sum(0).to(xf.dtype)  # sum_i g_i E_i(x)
        if self.shared is not None:
            y = y + self.shared(xf)

        # Training signals (Switch eq. 4; ST-MoE eq. 5) and the statistics the loop logs.
        f = counts.to(probs.dtype) / (N * k)  # in the router's precision (float32 at least)
        lse2 = torch.logsumexp(logits, dim=-1).square()
        if grouped_stats:
            # Over the group's micro-batch (every rank's micro-batch a together: the rows one process
            # would route at once): f_i from the all-reduced counts and token total, and this rank's
            # share E * sum_i f_i * sum_x p_i(x) / N_group, which sums over the ranks to eq. 4 (P_i's
            # all-reduce is that sum: DDP's mean of W x the shares); the z-loss likewise.
            tot = self.group_sum(torch.cat([counts.to(probs.dtype), probs.new_tensor([N])]).detach()
                                 * self.group_weight)
            n_group = tot[E].clamp_min(1)
            f = tot[:E] / (n_group * k)
            balance = E * (f * probs.sum(dim=0)).sum() / n_group
            z = lse2.sum() / n_group
        else:
            balance = E * (f * probs.mean(dim=0)).sum()
            z = lse2.mean()
        self.aux_loss = self.c.aux_loss_coef * balance + self.c.z_loss_coef * z
        entropy = -(probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        self.stats = {"expert_fraction": f.detach(), "dropped": dropped.detach(),
                      "entropy": entropy.detach()}
        return y


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
