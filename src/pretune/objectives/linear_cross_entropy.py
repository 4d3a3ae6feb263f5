"""The output layer and its cross-entropy in one pass, a chunk of rows at a time.

`F.cross_entropy(h @ W^T, y)` materialises the (N, V) logits (134 MB for a
16 x 256 batch and an 8,192-token vocabulary; 824 MB for GPT-2's), reads and
writes them several times in the forward and backward passes, and fills a
(N, V) zero tensor for the gradient. Here each chunk of rows computes its
logits, its loss and, at once, its gradients

    dL/dz = (softmax(z) - onehot(y)) / n,   dL/dh = dL/dz W,   dL/dW += dL/dz^T h

while the chunk is still in cache, and the backward pass only scales the
stored gradients by the incoming one. Same matrix products, no (N, V) tensor,
about 20% less time for the head and loss on a CPU (docs/performance.md). The
idea is Liger Kernel's fused linear cross-entropy (Hsu et al. 2024) and the
chunked loss of torchtune; this is plain PyTorch.

Used by `objectives.next_token_loss` for fp32 outside autocast; under autocast
the plain path runs, since the products there belong to autocast's dtype rules.
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
        gW = torch.zeros_like(W) if want_grad else None
        total = h.new_zeros(())
        for s in range(0, h.shape[0], rows):
            hc, yc, vc = h[s:s + rows], yv[s:s + rows], valid[s:s + rows]
            z = hc @ W.t()                                   # the chunk's logits
            lse = torch.logsumexp(z, -1, keepdim=True)
            total += ((lse - z.gather(1, yc)).squeeze(1) * vc).sum()
            if want_grad:
                z.sub_(lse).exp_()                           # softmax(z), in place
                z.scatter_add_(1, yc, -vc[:, None].to(z.dtype))  # - onehot(y) at counted rows
                z.mul_(vc[:, None] / n)                      # ignored rows: 0; mean over n
                torch.mm(z, W, out=gh[s:s + rows])
                gW.addmm_(z.t(), hc)
        if want_grad:
            ctx.save_for_backward(gh, gW)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        gh, gW = ctx.saved_tensors
        return gh * grad, gW * grad, None, None


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cross_entropy(h @ W.T, y, ignore_index=IGNORE) over rows of h (..., d), without the logits."""
    h2, y1 = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    return LinearCrossEntropy.apply(h2, W, y1, chunk_rows(W.shape[0]))
