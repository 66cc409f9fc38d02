"""The input checks every entry point of the math runs before any row work: dense logits, sparse rows, the
combination's scalars, teacher tokens, row masks and the proxy (rows or dense logits). Each raises ValueError (or
TypeError) naming the argument; `values=False` checks shapes and types only (the Triton kernels check values
inside their own passes).
"""
from __future__ import annotations

import math

import torch

from bayeskd.core.adaptive import adaptive_settings
from bayeskd.core.sparse import SparseDist
from bayeskd.core.names import MODES

__all__ = ["check_logits", "check_dist", "check_scalars", "check_teacher_tokens", "check_mask", "check_proxy"]


def check_logits(x: torch.Tensor, name: str, vocab_size: int | None = None, rows: int | None = None,
                 values: bool = True) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, V], got shape {tuple(x.shape)}")
    if vocab_size is not None and x.shape[1] != vocab_size:
        raise ValueError(f"{name} has V={x.shape[1]} but the prior has V={vocab_size}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows but the prior has {rows}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    # one float32 row sum finds NaN and +-inf without an [N, V] boolean temporary
    if values and not torch.isfinite(x.sum(dim=1, dtype=torch.float32)).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_dist(d: SparseDist, name: str, vocab_size: int | None = None, rows: int | None = None,
               values: bool = True) -> None:
    if not isinstance(d, SparseDist):
        raise TypeError(f"{name} must be a SparseDist, got {type(d).__name__}")
    if vocab_size is not None and d.vocab_size != vocab_size:
        raise ValueError(f"{name} has V={d.vocab_size} but the prior has V={vocab_size}")
    if rows is not None and d.num_rows != rows:
        raise ValueError(f"{name} has {d.num_rows} rows but the prior has {rows}")
    if d.indices.dim() != 2 or d.logprobs.shape != d.indices.shape or d.tail.shape != (d.num_rows,):
        raise ValueError(f"{name}: indices {tuple(d.indices.shape)}, logprobs {tuple(d.logprobs.shape)} and tail "
                         f"{tuple(d.tail.shape)} must be [N, K], [N, K] and [N]")
    if d.indices.dtype.is_floating_point:
        raise ValueError(f"{name}: indices must be integers, got {d.indices.dtype}")
    if d.k > d.vocab_size:  # as SparseDist.validate and the Triton kernel: a row lists at most V distinct tokens
        raise ValueError(f"{name}: K={d.k} is larger than the vocabulary size V={d.vocab_size}")
    if not values:
        return
    if ((d.indices < -1) | (d.indices >= d.vocab_size)).any():
        raise ValueError(f"{name}: a token index is outside [0, V={d.vocab_size})")
    srt = d.indices.sort(dim=1).values  # a token listed twice would be counted twice (silently wrong mass)
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        raise ValueError(f"{name}: a row lists the same token index twice")
    listed = d.indices >= 0
    lp = d.logprobs
    if torch.isnan(lp).any() or (lp[listed] == float("inf")).any() or not torch.isfinite(d.tail).all():
        raise ValueError(f"{name} contains NaN or infinite values in logprobs or tail")


def check_scalars(mode, a, b, c, w, evidence, teacher_tokens, top_k=None, vocab_size=None, theta=None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("a", a), ("b", b), ("c", c), ("w", w), ("evidence", evidence)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if w > 1:
        raise ValueError(f"w must be in [0, 1], got {w}")
    if mode == "dirichlet" and c <= 0:
        raise ValueError(f"Dirichlet mode needs a concentration c > 0, got {c}")
    if mode == "adaptive":
        adaptive_settings(theta)  # a clear error for missing or malformed settings, before any row work
    if evidence > 0 and teacher_tokens is None:
        raise ValueError("evidence > 0 needs teacher_tokens")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, V={vocab_size}]")


def check_teacher_tokens(y: torch.Tensor | None, rows: int, vocab_size: int, mask=None) -> torch.Tensor | None:
    if y is None:
        return None
    if y.shape != (rows,) or y.dtype.is_floating_point:
        raise ValueError(f"teacher_tokens must be an integer tensor of shape ({rows},), got {y.dtype} "
                         f"{tuple(y.shape)}")
    y = y.long()
    if mask is not None:  # masked rows (prompt, padding) often carry -100: they are never used
        y = torch.where(mask, y, torch.zeros_like(y))
    if ((y < 0) | (y >= vocab_size)).any():
        bad = y[(y < 0) | (y >= vocab_size)][0].item()
        raise ValueError(f"teacher token {bad} is outside [0, V={vocab_size}); mask such rows")
    return y


def check_mask(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != (rows,):
        raise ValueError(f"mask must have shape ({rows},), got {tuple(mask.shape)}")
    return mask.bool()


def check_proxy(prior: SparseDist, proxy, values: bool = True):
    """(proxy SparseDist or None, proxy logits or None), validated against the prior."""
    if proxy is None:
        return None, None
    if isinstance(proxy, torch.Tensor):
        check_logits(proxy, "proxy logits", prior.vocab_size, prior.num_rows, values)
        return None, proxy
    check_dist(proxy, "proxy", prior.vocab_size, prior.num_rows, values)
    return proxy, None
