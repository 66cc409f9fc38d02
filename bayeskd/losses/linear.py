"""lm_head + sparse KD from the student's last hidden states, without the [N, V] logits in memory.

Two ops compute `fused_posterior_kd(hidden @ weight.T, ...)`:
- chunked (`bayeskd.kernels.fused_linear_sparse_kd`): rows in chunks, each chunk's logits built and turned into
  their gradient at once; peak extra memory is one chunk of logits. PyTorch or Triton chunk loss.
- cut (`bayeskd.kernels.cut_sparse_kd`, Triton): the logits exist only as tiles on chip (online log-sum-exp,
  gathered entries at the target's support, recomputation in backward), as Cut Cross-Entropy does for CE. The
  target side runs here (`cut_head`): the same posterior and divergence math as the PyTorch path
  (`bayeskd.losses.fused`), on [N, |U|] numbers.
"""
from __future__ import annotations

from typing import Callable

import torch

from bayeskd.core.adaptive import Theta
from bayeskd.core.checks import check_logits
from bayeskd.core.combine import combine_rows
from bayeskd.core.sparse import NEG_INF, SparseDist
from bayeskd.losses.divergences import divergence_grads, row_divergence, tempered_target
from bayeskd.losses.fused import LossArgs, fused_forward, pick_backend, prepare_args

S_B_FLOOR = 1e-30  # the bucket's student share, floored as the fused Triton kernel floors it


def torch_chunk_loss(logits: torch.Tensor, targets: tuple, kwargs: dict, need_grad: bool) -> torch.Tensor:
    """The PyTorch chunk loss of the chunked op: loss [c] of one chunk of logits, whose values are replaced by
    their gradient (when `need_grad`; otherwise they are scratch). `targets` and `kwargs` are the validated,
    resolved arguments the kernel's chunk loop slices per chunk (per-row mixture weights included)."""
    p_idx, p_lp, p_tail, q_idx, q_lp, q_tail, q_logits = targets
    if kwargs.get("check_finite", True):  # NaN/inf in hidden or lm_head would otherwise give a silent NaN loss
        check_logits(logits, "student logits (hidden @ weight.T)")
    args = LossArgs(logits.shape[1], p_idx, p_lp, p_tail, q_idx, q_lp, q_tail, q_logits, kwargs["mode"],
                    kwargs["a"], kwargs["b"], kwargs["w_rows"], kwargs["teacher_tokens"], kwargs["evidence"],
                    kwargs["divergence"], kwargs["beta"], kwargs["temperature"], kwargs["mask"], kwargs["tail"],
                    inplace=True)
    z = logits.detach()
    return fused_forward(z, z, args)


def cut_head(args: LossArgs, ce_tokens: torch.Tensor | None = None) -> Callable:
    """The target side of the cut op for validated arguments `args` (see `cut_sparse_kd`'s `head`).

    Per kept row: the posterior on U (`combine_rows`), the student's log-probabilities on U and on the bucket
    from the gathered logits and the row's (max, sum), the divergence, and the gradient w.r.t. the logits in the
    fused kernel's form: d_v = (clamp(s_v gB, ±|h_B|) - s_v ḡ) / T outside U (bucket; 0 with tail="ignore") and
    (h_u - s_u ḡ) / T on U, stored as its difference e_u to the outside formula so backward adds the dense part
    everywhere and e on U.
    With `ce_tokens` (int [N]) the head also returns each kept row's cross-entropy logsumexp(z) - z_y (at
    temperature 1 whatever the KD's), the second output, whose gradient softmax(z) - onehot(y) joins the same
    backward pass; at T != 1 the kernel supplies z's own (max, sum) as `t1` (cut_sparse_kd's with_t1).
    """
    T = args.temperature

    def head(row_max: torch.Tensor, row_sum: torch.Tensor, gather: Callable, need_grad: bool, t1=None):
        n, dev = row_max.shape[0], row_max.device
        keep = torch.arange(n, device=dev) if args.mask is None else args.mask.nonzero()[:, 0]
        sel = lambda t: None if t is None else t[keep]  # noqa: E731
        U, lp, log_tail, R = combine_rows(
            args.vocab_size, sel(args.prior_idx), sel(args.prior_lp), sel(args.prior_tail), sel(args.proxy_idx),
            sel(args.proxy_lp), sel(args.proxy_tail), sel(args.proxy_logits), mode=args.mode, a=args.a, b=args.b,
            w_rows=sel(args.w_rows), teacher_tokens=sel(args.teacher_tokens), evidence=args.evidence)
        valid = U >= 0
        if args.tail == "ignore" and not valid.any(dim=1).all():
            raise ValueError('tail="ignore" needs at least one listed target entry in every unmasked row')
        J = U.shape[1]
        idx = torch.full((n, J + (ce_tokens is not None)), -1, dtype=torch.int32, device=dev)
        idx[keep, :J] = U.to(torch.int32)
        if ce_tokens is not None:  # one more column: the CE token (it may repeat an entry of U)
            idx[keep, J] = ce_tokens[keep].to(torch.int32)
        z = gather(idx)[keep]
        x_u = (z[:, :J] / T).masked_fill(~valid, NEG_INF)  # z/T on U
        log_pu, log_pb = tempered_target(lp, log_tail, R, T, args.tail)
        if args.tail == "bucket":
            mx, total = row_max[keep], row_sum[keep]
            log_total = mx + total.log()
            log_su = x_u - log_total[:, None]
            # s_B = (S - S_U) / S against the row's max, as the fused kernel forms it (the outside tokens cannot
            # be summed apart here: they are never written)
            s_out = (total - torch.exp(x_u - mx[:, None]).sum(dim=1)).clamp(min=0) / total
            log_sb = torch.where(R > 0, s_out.clamp(min=S_B_FLOOR).log(), NEG_INF)
            log_p, log_s = torch.cat([log_pu, log_pb[:, None]], 1), torch.cat([log_su, log_sb[:, None]], 1)
        else:
            log_su = x_u - torch.logsumexp(x_u, dim=1, keepdim=True)
            log_p, log_s = log_pu, log_su
        loss = torch.zeros(n, dtype=torch.float32, device=dev)
        loss[keep] = row_divergence(log_p, log_s, args.divergence, args.beta).float()
        if ce_tokens is not None:
            mx1, total1 = (row_max, row_sum) if T == 1.0 else t1  # logsumexp(z) at temperature 1
            ce = torch.zeros(n, dtype=torch.float32, device=dev)
            ce[keep] = (mx1[keep] + total1[keep].log() - z[:, J]).float()
            loss = (loss, ce)
        if not need_grad:
            return loss, None
        h, g = divergence_grads(log_p, log_s, args.divergence, args.beta)
        s_u = log_su.exp()
        row = lambda t: torch.zeros(n, dtype=torch.float32, device=dev).index_put((keep,), t.float())  # noqa
        if args.tail == "bucket":
            gB, cap = g[:, -1], h[:, -1].abs()
            e = h[:, :-1] - torch.minimum(torch.maximum(s_u * gB[:, None], -cap[:, None]), cap[:, None])
            dense = dict(gB=row(gB / T), cap=row(cap / T), gbar=row(h.sum(dim=1) / T), dense=True)
        else:
            e = h - s_u * h.sum(dim=1, keepdim=True)
            zero = torch.zeros(n, dtype=torch.float32, device=dev)
            dense = dict(gB=zero, cap=zero, gbar=zero, dense=False)
        e_full = torch.zeros(n, idx.shape[1], dtype=torch.float32, device=dev)
        e_full[keep, :J] = (e / T).masked_fill(~valid, 0.0).float()
        coef = dict(idx=idx, e=e_full, **dense)
        if ce_tokens is not None:  # CE's gradient s1 - onehot(y): -1 at y, and +s1 everywhere
            e_ce = torch.zeros_like(e_full)
            e_ce[keep, J] = -1.0
            if T == 1.0:  # s1 is the KD's own softmax: its dense part is -s·gbar with gbar = -1
                coef.update(extra=[(e_ce, e_ce.sum(dim=1))], dense=True)
            else:  # a second softmax, at temperature 1, in the same tiles
                coef.update(extra_t1=[(e_ce, -e_ce.sum(dim=1))], dense=True)
        return loss, coef

    return head


def fused_linear_posterior_kd(hidden: torch.Tensor, weight: torch.Tensor, prior: SparseDist,
                              proxy: SparseDist | torch.Tensor | None = None, *, mode: str = "log_linear",
                              a: float = 1.0, b: float = 1.0, c: float = 1.0, w: float = 0.5,
                              theta: Theta | None = None,
                              teacher_tokens: torch.Tensor | None = None, evidence: float = 0.0,
                              divergence: str = "forward_kl", beta: float | None = None, temperature: float = 1.0,
                              mask: torch.Tensor | None = None, tail: str = "bucket", chunk_size: int | None = None,
                              cut: bool = False, bias: torch.Tensor | None = None,
                              backend: str = "auto") -> torch.Tensor:
    """`fused_posterior_kd` of the logits hidden @ weight.T (hidden [N, H], weight [V, H]: the lm_head), without
    ever holding the [N, V] logits. Differentiable w.r.t. hidden and weight (and `bias`, cut op only).

    cut=False: the chunked op (rows in chunks of `chunk_size`). cut=True with the Triton backend: the cut-logits
    kernel (no logits beyond on-chip tiles; `bias` supported); the PyTorch backend has no cut kernel and runs the
    chunked op. backend: see `bayeskd.losses.fused.pick_backend`.
    """
    posterior = dict(mode=mode, a=a, b=b, c=c, w=w, theta=theta, teacher_tokens=teacher_tokens, evidence=evidence)
    return _linear_op(hidden, weight, prior, proxy, posterior, divergence, beta, temperature, mask, tail,
                      chunk_size, cut, bias, backend)


def fused_linear_kd_and_ce(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, prior: SparseDist,
                           proxy: SparseDist | torch.Tensor | None = None, *, divergence: str = "forward_kl",
                           beta: float | None = None, temperature: float = 1.0, mask: torch.Tensor | None = None,
                           tail: str = "bucket", chunk_size: int | None = None, cut: bool = False,
                           bias: torch.Tensor | None = None, backend: str = "auto",
                           **posterior) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD per row, as `fused_linear_posterior_kd`; CE per row on `tokens` at temperature 1), rows with mask False
    0 in both. With the cut kernel both come from one pass over the logits, at any KD temperature (CE's gradient
    softmax(z) - onehot(y) joins the KD's in the same backward); otherwise two ops, CE as the KL from the one-hot
    of `tokens` (the same number). `posterior`: mode, a, b, c, w, theta, teacher_tokens, evidence."""
    if tokens.shape != (hidden.shape[0],):
        raise ValueError(f"tokens must have shape ({hidden.shape[0]},), got {tuple(tokens.shape)}")
    if bool(((tokens < 0) | (tokens >= weight.shape[0])).any()):  # one host sync
        raise ValueError(f"tokens must lie in [0, {weight.shape[0]})")
    tokens = tokens.to(hidden.device)
    joint = uses_cut_kernel(cut, backend, hidden.device)
    kd = _linear_op(hidden, weight, prior, proxy, posterior, divergence, beta, temperature, mask, tail, chunk_size,
                    cut, bias, backend, ce_tokens=tokens if joint else None)
    if joint:
        return kd
    return kd, fused_linear_ce(hidden, weight, tokens, mask=mask, chunk_size=chunk_size, cut=cut, bias=bias,
                               backend=backend)


def fused_linear_ce(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                    mask: torch.Tensor | None = None, chunk_size: int | None = None, cut: bool = False,
                    bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Cross-entropy per row on `tokens` from the hidden states: the KL from the tokens' one-hot (the same
    number), through the same lm_head ops."""
    zeros = torch.zeros(len(tokens), device=hidden.device)
    one_hot = SparseDist(tokens[:, None].to(device=hidden.device, dtype=torch.int32), zeros[:, None], zeros,
                         weight.shape[0])
    return _linear_op(hidden, weight, one_hot, None, {}, "forward_kl", None, 1.0, mask, "bucket", chunk_size, cut,
                      bias, backend)


def uses_cut_kernel(cut: bool, backend: str, device: torch.device) -> bool:
    """Whether cut=True runs the cut-logits kernel: it needs the Triton backend (else the chunked op runs)."""
    return bool(cut) and pick_backend(backend, device) == "triton"


def _matmul_dtype(hidden, weight, bias):
    """hidden, weight, bias in the dtype lm_head(hidden) would run in: autocast's when it is on (mixed-precision
    training keeps an fp32 lm_head and multiplies in bf16), else the promoted dtype. The casts are ordinary
    autograd ops, so the gradients reach the tensors given, in their dtypes."""
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(hidden.dtype,
                                                                                                  weight.dtype)
    return tuple(t if t is None or t.dtype == dt else t.to(dt) for t in (hidden, weight, bias))


def _linear_op(hidden, weight, prior, proxy, posterior: dict, divergence, beta, temperature, mask, tail, chunk_size,
               cut, bias, backend, ce_tokens=None):
    from bayeskd.kernels.fused_linear_sparse_kd import fused_linear_sparse_kd

    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    chosen = pick_backend(backend, hidden.device)
    use_cut = uses_cut_kernel(cut, backend, hidden.device)
    if bias is not None and not use_cut:
        raise ValueError("bias is supported by the cut-logits kernel only (cut=True with the Triton backend)")
    shape_only = hidden.new_empty(()).expand(hidden.shape[0], weight.shape[0])  # no memory: shapes are checked
    p = dict(dict(mode="log_linear", a=1.0, b=1.0, c=1.0, w=0.5, theta=None, teacher_tokens=None, evidence=0.0),
             **posterior)
    # the cut op's target side is PyTorch: its inputs are checked here (the chunked Triton kernel checks its own)
    args = prepare_args(shape_only, prior, proxy, p["mode"], p["a"], p["b"], p["c"], p["w"], p["teacher_tokens"],
                        p["evidence"], divergence, beta, temperature, mask, tail, False,
                        check_values=chosen == "torch" or use_cut, student_values=False, theta=p["theta"])
    hidden, weight, bias = _matmul_dtype(hidden, weight, bias)  # both ops multiply in one dtype
    if use_cut:
        from bayeskd.kernels.cut_sparse_kd import cut_sparse_kd
        return cut_sparse_kd(hidden, weight, cut_head(args, ce_tokens), bias=bias, temperature=args.temperature,
                             with_t1=ce_tokens is not None and args.temperature != 1.0)
    return fused_linear_sparse_kd(
        hidden, weight, args.prior_idx, args.prior_lp, args.prior_tail, args.proxy_idx, args.proxy_lp,
        args.proxy_tail, args.proxy_logits, mode=args.mode, a=args.a, b=args.b, w_rows=args.w_rows,
        teacher_tokens=args.teacher_tokens, evidence=args.evidence, divergence=args.divergence, beta=args.beta,
        temperature=args.temperature, mask=args.mask, tail=args.tail, chunk_size=chunk_size,
        chunk_loss=torch_chunk_loss if chosen == "torch" else None)
