"""The output layer and its cross-entropy in one pass, a chunk of rows at a time.

`F.cross_entropy(h @ W^T, y)` materialises the (N, V) logits (134 MB for a
16 x 256 batch and an 8,192-token vocabulary; 824 MB for GPT-2's), reads and
writes them several times in the forward and backward passes, and fills a
(N, V) zero tensor for the gradient. Here each chunk of rows computes its
logits, its loss and, at once, its gradients

    dL/dz = (softmax(z) - onehot(y)) / n,   dL/dh = dL/dz W,   dL/dW += dL/dz^T h

while the chunk is still in cache, and the backward pass only scales the
stored gradients by the incoming one. Same matrix products, no (N, V) tensor in
fp32 (under bf16 one, in bf16, for W's gradient: below), about 20% less time for
the head and loss on a CPU (docs/performance.md). The
idea is Liger Kernel's fused linear cross-entropy (Hsu et al. 2024) and the
chunked loss of torchtune; this is plain PyTorch.

Used by `objectives.next_token_loss` for fp32, and under bf16 autocast with h and W
cast to bf16 once: the products in bf16 as autocast would run them (logits rounded
to bf16, as autocast's matmul outputs are), the softmax, its log and the loss in fp32
per chunk, and W's gradient one bf16 product over all rows at the end (the chunks' dL/dz
kept in bf16, (N, V): fp32 accumulation inside the kernel, rounded to bf16 once, as the plain
path's one bf16 product is). At gpt-mini under bf16 the plain path's
log-softmax, its backward and the (N, V) casts to fp32 were about a fifth of a step
(torch.profiler, docs/performance.md).
"""

from __future__ import annotations

import torch


IGNORE = -100


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: at least 256 (timed from 32 to 512 on one core: 256-512 rows were
    fastest both at V = 8,192, where a chunk's logits are 8 MB and stay in cache, and at
    V = 50,257, where fewer rows make the products less efficient), more for a small V."""
    return max(256, min(4096, (1 << 21) // vocab))


class LinearCrossEntropy(torch.autograd.Function):
    """mean over non-IGNORE rows of -log softmax(h W^T)[y]; h (N, d), W (V, d), y (N,)."""

    @staticmethod
    def forward(ctx, h, W, y, rows: int):
        valid = y != IGNORE
        n = valid.sum()  # a tensor: no host sync
        yv = torch.where(valid, y, 0)[:, None]
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if want_grad else None
        half = h.dtype != torch.float32
        # fp32: W's gradient summed chunk by chunk. bf16: each chunk's dL/dz kept, (N, V) in bf16, for
        # one product dL/dz^T h at the end (fp32 accumulation inside the kernel, rounded to bf16 once,
        # as autocast's one product is): per chunk, a product over only `rows` rows ran at 33 GFLOP/s
        # against 45 over all 1,024 (GPT-2's V, one loaded core), and summing the chunks' bf16 products
        # into an fp32 (V, d) cast and added 77 MB a chunk (profile: 10% of the GPT-2-small bf16 step)
        gW = torch.zeros_like(W, dtype=torch.float32) if want_grad and not half else None
        dz = h.new_empty((h.shape[0], W.shape[0])) if want_grad and half else None
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], rows):
            hc, yc, vc = h[s:s + rows], yv[s:s + rows], valid[s:s + rows]
            # the chunk's logits, then log softmax in fp32 in PyTorch's one fused, vectorized kernel
            # (it reads bf16 logits directly): against logsumexp, the cast and sub_/exp_ it saves a
            # copy and two passes over (rows, V) (gpt-mini, bf16: 95 against 116 ms a chunk of 1,024)
            z = torch.log_softmax(hc @ W.t(), -1, dtype=torch.float32)
            total -= (z.gather(1, yc).squeeze(1) * vc).sum()
            if want_grad:
                z.exp_()                                     # softmax(z), in place
                z.scatter_add_(1, yc, -vc[:, None].to(z.dtype))  # - onehot(y) at counted rows
                z.mul_(vc[:, None] / n)                      # ignored rows: 0; mean over n
                if half:
                    zc = dz[s:s + rows]
                    zc.copy_(z)
                    torch.mm(zc, W, out=gh[s:s + rows])
                else:
                    torch.mm(z, W, out=gh[s:s + rows])
                    gW.addmm_(z.t(), hc)
        if want_grad:
            ctx.save_for_backward(gh, dz.t() @ h if half else gW.to(W.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad):
        gh, gW = ctx.saved_tensors
        return gh * grad, gW * grad, None, None


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cross_entropy(h @ W.T, y, ignore_index=IGNORE) over rows of h (..., d), without the logits.
    h and W in fp32, or both in bf16 (the loss in fp32 either way)."""
    h2, y1 = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    rows = chunk_rows(W.shape[0])  # bf16 too: 4x larger chunks left cache (gpt-mini: 1.4-1.7 s against 0.7-0.95 s)
    return LinearCrossEntropy.apply(h2, W, y1, rows)
