"""Fused lm_head + posterior sparse-KD: the loss from the student's last hidden states without ever holding the
full [N, V] logits.

Rows are processed in chunks: logits_chunk = hidden_chunk @ weight.T, the fused kernel (sparse_kd.py)
turns that chunk into its gradient in place, and the chunk's contribution to grad_hidden and grad_weight is
taken right away. Peak extra memory is one chunk of logits (≤ ~1/8 of the full logits) plus grad_hidden and
grad_weight, which the backward pass needs anyway.

Backward scales the stored gradients by grad_output. grad_hidden scales per row exactly; grad_weight is a sum
over rows, so a non-uniform per-row grad_output (anything but a scalar broadcast such as loss.sum() or
loss.mean()) triggers one recomputation pass over the chunks to rebuild grad_weight with the row weights.
grad_weight accumulates in the weight's dtype (as a bf16 lm_head's own gradient would).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .sparse_kd import sparse_kd_forward

_ROW_KEYS = ("w_rows", "teacher_tokens", "mask")  # per-row keyword arguments sliced with the chunk


def default_chunk_size(n: int) -> int:
    """Rows per chunk: at most ~1/8 of the rows (so chunk logits ≤ 1/8 of the full logits), but not so few
    that the matmuls become inefficient (at least 256 rows, or all of them when N is small)."""
    return max(min(n, 256), math.ceil(n / 8))


def _chunk_loss_and_grad(logits: torch.Tensor, targets: tuple, kwargs: dict[str, Any],
                         chunk_loss: Callable | None, need_grad: bool) -> torch.Tensor:
    """Loss [c] of one chunk; when need_grad, the gradient w.r.t. the logits overwrites `logits`."""
    if chunk_loss is None:
        loss, _ = sparse_kd_forward(logits, *targets, inplace=True, compute_grad=need_grad, **kwargs)
        return loss
    return chunk_loss(logits, targets, kwargs, need_grad)


def _slice_targets(targets: tuple, s: int, e: int) -> tuple:
    return tuple(t[s:e] if t is not None else None for t in targets)


def _slice_kwargs(kwargs: dict[str, Any], s: int, e: int) -> dict[str, Any]:
    return {k: (v[s:e] if k in _ROW_KEYS and v is not None else v) for k, v in kwargs.items()}


def _run_chunks(hidden, weight, targets, kwargs, chunk, chunk_loss, grad_hidden, grad_weight, row_scale=None):
    """One pass over the row chunks; fills grad_hidden / grad_weight (either may be None); returns the loss."""
    n = hidden.shape[0]
    need_grad = grad_hidden is not None or grad_weight is not None
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h = hidden[s:e]
        logits = h @ weight.t()  # [c, V] in the input dtype (fp32 accumulation inside the matmul)
        loss[s:e] = _chunk_loss_and_grad(logits, _slice_targets(targets, s, e), _slice_kwargs(kwargs, s, e),
                                         chunk_loss, need_grad)
        if not need_grad:
            continue
        g = logits  # now the gradient w.r.t. the chunk's logits
        if row_scale is not None:
            g.mul_(row_scale[s:e, None].to(g.dtype))
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[s:e])
        if grad_weight is not None:
            grad_weight.addmm_(g.t(), h)
    return loss


class FusedLinearSparseKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, prior_idx, prior_logp, prior_tail, proxy_idx, proxy_logp, proxy_tail,
                proxy_logits, cfg):
        kwargs, chunk, chunk_loss = cfg["kwargs"], cfg["chunk"], cfg["chunk_loss"]
        targets = (prior_idx, prior_logp, prior_tail, proxy_idx, proxy_logp, proxy_tail, proxy_logits)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = _run_chunks(hidden, weight, targets, kwargs, chunk, chunk_loss, grad_hidden, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.recompute = (hidden.detach(), weight.detach(), targets, kwargs, chunk, chunk_loss)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        go = grad_output
        uniform = go.numel() == 0 or go.stride(0) == 0 or bool((go == go[0]).all())
        if grad_hidden is not None:
            if uniform:
                if go.numel() and go[0].item() != 1.0:
                    grad_hidden.mul_(go[0].to(grad_hidden.dtype))
            else:
                grad_hidden.mul_(go[:, None].to(grad_hidden.dtype))
        if grad_weight is not None:
            if uniform:
                if go.numel() and go[0].item() != 1.0:
                    grad_weight.mul_(go[0].to(grad_weight.dtype))
            else:  # Σ_rows go_r g_r h_r^T cannot be had from Σ_rows g_r h_r^T: rebuild it
                hidden, weight, targets, kwargs, chunk, chunk_loss = ctx.recompute
                grad_weight.zero_()
                _run_chunks(hidden, weight, targets, {**kwargs, "check_finite": False}, chunk, chunk_loss, None,
                            grad_weight, row_scale=go.float())
        ctx.recompute = None
        return (grad_hidden, grad_weight) + (None,) * 8


def fused_linear_sparse_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    prior_idx: torch.Tensor,
    prior_logp: torch.Tensor,
    prior_tail: torch.Tensor,
    proxy_idx: torch.Tensor | None = None,
    proxy_logp: torch.Tensor | None = None,
    proxy_tail: torch.Tensor | None = None,
    proxy_logits: torch.Tensor | None = None,
    *,
    mode: str = "log_linear",
    a: float = 1.0,
    b: float = 1.0,
    w_rows: torch.Tensor | None = None,
    teacher_tokens: torch.Tensor | None = None,
    evidence: float = 0.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    tail: str = "bucket",
    chunk_size: int | None = None,
    chunk_loss: Callable | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Per-row loss (float32 [N]) of softmax((hidden @ weight.T) / T) against the posterior target.

    hidden [N, H], weight [V, H] (the lm_head). Target arguments as in `triton_fused_posterior_kd`.
    `chunk_loss`: None runs the Triton kernel on each chunk (on CPU only under TRITON_INTERPRET=1); a callable
    (logits, targets, kwargs, need_grad) -> loss replaces it (`bayeskd.losses.linear.torch_chunk_loss`, the PyTorch
    path). Users call `bayeskd.losses.fused_linear_posterior_kd`, which validates and picks the backend.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    n = hidden.shape[0]
    chunk = int(chunk_size) if chunk_size else default_chunk_size(n)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    kwargs = dict(mode=mode, a=a, b=b, w_rows=w_rows, teacher_tokens=teacher_tokens, evidence=evidence,
                  divergence=divergence, beta=beta, temperature=temperature, mask=mask, tail=tail,
                  check_finite=check_finite)
    cfg = {"kwargs": kwargs, "chunk": chunk, "chunk_loss": chunk_loss}
    return FusedLinearSparseKDFunction.apply(hidden, weight, prior_idx, prior_logp, prior_tail, proxy_idx,
                                             proxy_logp, proxy_tail, proxy_logits, cfg)
