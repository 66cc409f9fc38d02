"""Context-adaptive combination (mode "adaptive"): the mixture w_t·p0 + (1 − w_t)·q whose prior weight
w_t = σ(θ · f_t) follows what the rows say about their context (docs/MATH.md, "adaptive").

f_t (`FEATURES`, standardized with the mean and standard deviation of the rows θ was fit on): log(1 + context
count), log(1 + match length) (a suffix prior's extra; 0 when the rows lack it), the prior row's entropy, the
proxy row's entropy, and a bias. `fit_adaptive` chooses θ by the mean log-likelihood of the observed teacher tokens,
the criterion of `bayeskd.posterior.calibrate`. Its result, a dict of lists and floats, is the mode's settings:
`combine(prior, proxy, mode="adaptive", theta=result)`, and saved as JSON with the targets.

This module imports only `bayeskd.core.sparse`, so the checks and `combine` can use it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from bayeskd.core.sparse import SparseDist
from bayeskd.core.names import CONTEXT_COUNT, MATCH_LENGTH

FEATURES = ("log1p_context_count", "log1p_match_length", "prior_entropy", "proxy_entropy", "bias")
_EXTRA_OF = {"log1p_context_count": CONTEXT_COUNT, "log1p_match_length": MATCH_LENGTH}
_BIAS = FEATURES.index("bias")
_SETTINGS_KEYS = ("theta", "features", "mean", "std", "extras")
_CHUNK_BYTES = 32 << 20  # float64 scratch per chunk of dense proxy logits
# the settings: fit_adaptive's result (or a dict with its keys), or a plain θ over unscaled features
Theta = dict[str, Any] | Sequence[float] | torch.Tensor

__all__ = ["FEATURES", "Theta", "adaptive_features", "adaptive_weights", "adaptive_settings",
           "prior_weights", "fit_adaptive"]


# ----------------------------------------------------------------------------------------------------------
# per-row statistics of sparse rows and dense logits

def sparse_entropy(d: SparseDist) -> torch.Tensor:
    """Entropy (nats) of each row, float64 [N]: the listed entries plus the tail spread uniformly."""
    listed = d.indices >= 0
    lp = d.logprobs.double().masked_fill(~listed, -math.inf)
    p = lp.exp()
    h = -torch.where(p > 0, p * lp, torch.zeros((), dtype=torch.float64)).sum(dim=1)
    unlisted = d.vocab_size - listed.sum(dim=1)
    t = d.tail.double().clamp(min=0)
    log_tau = t.log() - unlisted.clamp(min=1).double().log()
    return h + torch.where((t > 0) & (unlisted > 0), -t * log_tau, torch.zeros_like(t))


def dense_stats(logits: torch.Tensor, tokens: torch.Tensor | None = None):
    """(entropy, log q(y) or None) of q = softmax(logits) per row, float64 [N], in chunks of rows so no float64
    copy of all [N, V] logits is ever held."""
    n, v = logits.shape
    chunk = max(1, _CHUNK_BYTES // (8 * max(v, 1)))
    h = torch.empty(n, dtype=torch.float64, device=logits.device)
    at_y = None if tokens is None else torch.empty(n, dtype=torch.float64, device=logits.device)
    for i in range(0, n, chunk):
        lq = torch.log_softmax(logits[i: i + chunk].double(), dim=1)
        h[i: i + chunk] = -(lq.exp() * lq).sum(dim=1)
        if at_y is not None:
            at_y[i: i + chunk] = lq.gather(1, tokens[i: i + chunk, None].to(lq.device)).squeeze(1)
    return h, at_y


# ----------------------------------------------------------------------------------------------------------
# features and weights

def adaptive_features(prior: SparseDist, proxy: SparseDist | torch.Tensor) -> torch.Tensor:
    """The features f_t of every row, float64 [N, F] in the order of `FEATURES`, unscaled, on the prior's device.
    `proxy`: its SparseDist rows, or dense [N, V] logits (online mode)."""
    if proxy is None:
        raise ValueError('mode="adaptive" needs a proxy (its entropy is a feature)')
    n, dev = prior.num_rows, prior.indices.device
    cols = []
    for name in FEATURES[:2]:
        key = _EXTRA_OF[name]
        x = prior.extras.get(key)
        if x is None:  # absent (a prior that does not know it): the feature is 0 on every row
            cols.append(torch.zeros(n, dtype=torch.float64, device=dev))
            continue
        x = x.to(device=dev, dtype=torch.float64).reshape(-1)
        if x.shape != (n,) or not torch.isfinite(x).all() or (x < 0).any():
            raise ValueError(f'prior.extras["{key}"] must be finite, >= 0 and have one value per row')
        cols.append(torch.log1p(x))
    cols.append(sparse_entropy(prior))
    h_q = dense_stats(proxy)[0] if isinstance(proxy, torch.Tensor) else sparse_entropy(proxy)
    cols.append(h_q.to(dev))
    cols.append(torch.ones(n, dtype=torch.float64, device=dev))
    return torch.stack(cols, dim=1)


def _floats(x: Any, name: str) -> list[float]:
    vals = [float(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]
    if len(vals) != len(FEATURES) or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"adaptive settings: {name} must hold {len(FEATURES)} finite numbers (one per feature "
                         f"{', '.join(FEATURES)}), got {vals}")
    return vals


def adaptive_settings(theta: Theta | None) -> dict[str, Any]:
    """The JSON-serializable settings of mode "adaptive": {"theta", "features", "mean", "std", "extras"}.

    `theta`: `fit_adaptive`'s result (its other keys, the fit's statistics, are dropped) or such a dict, or a plain
    θ over unscaled features (mean 0, std 1). "extras" names the prior extras the fit saw, which the rows must carry.
    """
    if theta is None:
        raise ValueError('mode="adaptive" needs theta: the settings fit_adaptive returns (theta, features, mean, '
                         'std), or a list of one weight per feature')
    if not isinstance(theta, dict):
        theta = {"theta": theta}
    if "theta" not in theta:
        raise ValueError(f"adaptive settings need a 'theta' entry, got keys {sorted(theta)}")
    features = list(theta.get("features", FEATURES))
    if features != list(FEATURES):
        raise ValueError(f"adaptive settings were fit on the features {features}; this version computes "
                         f"{list(FEATURES)}: fit them again")
    std = _floats(theta.get("std", [1.0] * len(FEATURES)), "std")
    if any(s <= 0 for s in std):
        raise ValueError(f"adaptive settings: std must be > 0, got {std}")
    extras = [str(e) for e in theta.get("extras", [])]
    if not set(extras) <= set(_EXTRA_OF.values()):
        raise ValueError(f"adaptive settings: unknown extras {extras}")
    return {"theta": _floats(theta["theta"], "theta"), "features": features,
            "mean": _floats(theta.get("mean", [0.0] * len(FEATURES)), "mean"), "std": std, "extras": extras}


def adaptive_weights(theta: Theta, features: torch.Tensor) -> torch.Tensor:
    """w_t = σ(θ · (f_t − mean) / std), float64 [N], from the settings (see `adaptive_settings`) and the
    unscaled `features` [N, F] of `adaptive_features`."""
    s = adaptive_settings(theta)
    if features.dim() != 2 or features.shape[1] != len(FEATURES):
        raise ValueError(f"features must be [N, {len(FEATURES)}], got {tuple(features.shape)}")
    as_t = lambda k: torch.tensor(s[k], dtype=torch.float64, device=features.device)  # noqa: E731
    return torch.sigmoid(((features.double() - as_t("mean")) / as_t("std")) @ as_t("theta"))


def prior_weights(prior: SparseDist, proxy: SparseDist | torch.Tensor, theta: Theta | None) -> torch.Tensor:
    """The per-row prior weights of mode "adaptive", float64 [N] (what `combine` and the fused losses use)."""
    s = adaptive_settings(theta)
    missing = [k for k in s["extras"] if k not in prior.extras]
    if missing:
        raise ValueError(f'mode="adaptive" was fit on prior rows with extras {s["extras"]}; these rows lack '
                         f"{missing}")
    return adaptive_weights(s, adaptive_features(prior, proxy))


# ----------------------------------------------------------------------------------------------------------
# fitting

def _mixture_nll(lw: torch.Tensor, l1w: torch.Tensor, lp0: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Mean −log(w·p0(y) + (1 − w)·q(y)) from log w, log(1 − w) and the token log-probabilities."""
    return -torch.logaddexp(lw + lp0, l1w + lq).mean()


def best_global_weight(lp0: torch.Tensor, lq: torch.Tensor, iters: int = 60) -> float:
    """The w in [0, 1] maximizing mean log(w·p0(y) + (1 − w)·q(y)): the log-likelihood is concave in w, so
    bisect on the sign of its derivative mean((p0 − q) / (w·p0 + (1 − w)·q)), decreasing in w."""
    m = torch.maximum(lp0, lq)  # the derivative is scale-free per row: divide by max(p0, q)
    a, b = (lp0 - m).exp(), (lq - m).exp()
    slope = lambda w: float(((a - b) / (w * a + (1 - w) * b)).mean())  # noqa: E731
    if slope(0.0) <= 0:
        return 0.0
    if slope(1.0) >= 0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def fit_adaptive(prior: SparseDist, proxy: SparseDist | torch.Tensor, teacher_tokens: torch.Tensor,
                 valid: torch.Tensor | None = None, *, l2: float = 1e-3, steps: int = 50) -> dict[str, Any]:
    """θ of mode "adaptive" maximizing the mean log-likelihood of the observed teacher tokens under the mixture
    w_t·p0 + (1 − w_t)·q, minus (l2 / 2)·|θ|² over every weight but the bias (L-BFGS in float64 on CPU,
    deterministic), started from the best single global weight, so it never fits worse than it.

    `prior`: the prior's rows at the teacher positions, queried with leave-one-out (otherwise p0 has counted y_t
    already); `proxy`: the proxy's rows or dense logits at the same positions; `valid`: the rows to fit on.
    Rows where both p0(y) and q(y) are 0 fit no θ: they are left out and counted in "excluded".

    Returns the settings ("theta", "features", "mean", "std", "extras": pass the dict as `combine`'s `theta`)
    and the fit's statistics: "nll" (train NLL, nats/token), "nll_global" and "w_global" (the best single
    global mixture weight on the same rows), "rows", "excluded", "l2", "steps".
    """
    if not (math.isfinite(l2) and l2 >= 0) or steps < 1:
        raise ValueError(f"fit_adaptive: l2 must be >= 0 and steps >= 1, got {l2}, {steps}")
    n, v = prior.num_rows, prior.vocab_size
    y = torch.as_tensor(teacher_tokens)
    if y.shape != (n,) or y.dtype.is_floating_point:
        raise ValueError(f"fit_adaptive: teacher_tokens must be an integer tensor of shape ({n},), got "
                         f"{y.dtype} {tuple(y.shape)}")
    keep = torch.ones(n, dtype=torch.bool) if valid is None else torch.as_tensor(valid).bool().cpu()
    if keep.shape != (n,):
        raise ValueError(f"fit_adaptive: valid must have shape ({n},), got {tuple(keep.shape)}")
    y = torch.where(keep, y.long().cpu(), torch.zeros((), dtype=torch.long))  # masked rows may carry -100
    if ((y < 0) | (y >= v)).any():
        raise ValueError(f"fit_adaptive: a teacher token is outside [0, V={v}); mask such rows with valid")

    feats = adaptive_features(prior, proxy).cpu()
    lp0 = prior.to("cpu").token_logprob(y)
    if isinstance(proxy, torch.Tensor):
        lq = dense_stats(proxy, y.to(proxy.device))[1].cpu()
    else:
        lq = proxy.to("cpu").token_logprob(y)
    possible = torch.isfinite(lp0) | torch.isfinite(lq)
    excluded = int((keep & ~possible).sum())
    keep = keep & possible
    if not keep.any():
        raise ValueError("fit_adaptive: no row to fit (every row is masked or has p0(y) = q(y) = 0)")
    X, lp0, lq = feats[keep], lp0[keep], lq[keep]

    # standardize so one L2 weight and L-BFGS's first step suit every feature; a constant column (the bias, an
    # absent extra) keeps std 1
    mean, std = X.mean(dim=0), X.std(dim=0, unbiased=False)
    mean[_BIAS] = 0.0
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    std[_BIAS] = 1.0
    Z = (X - mean) / std

    w_global = best_global_weight(lp0, lq)
    clamp = min(max(w_global, 1e-6), 1 - 1e-6)
    with torch.no_grad():
        nll_global = float(_mixture_nll(torch.tensor(w_global).log(), torch.tensor(1 - w_global).log(), lp0, lq))
    theta = torch.zeros(len(FEATURES), dtype=torch.float64)
    theta[_BIAS] = math.log(clamp / (1 - clamp))
    theta.requires_grad_(True)
    penalized = torch.ones_like(theta)
    penalized[_BIAS] = 0.0
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, max_eval=2 * steps, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        s = Z @ theta
        loss = _mixture_nll(F.logsigmoid(s), F.logsigmoid(-s), lp0, lq) + 0.5 * l2 * (penalized * theta ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = Z @ theta
        nll = float(_mixture_nll(F.logsigmoid(s), F.logsigmoid(-s), lp0, lq))
    extras = [_EXTRA_OF[f] for f in FEATURES[:2] if _EXTRA_OF[f] in prior.extras]
    return {"theta": theta.detach().tolist(), "features": list(FEATURES), "mean": mean.tolist(),
            "std": std.tolist(), "extras": extras, "nll": nll, "nll_global": nll_global, "w_global": w_global,
            "rows": int(keep.sum()), "excluded": excluded, "l2": float(l2), "steps": int(steps)}
