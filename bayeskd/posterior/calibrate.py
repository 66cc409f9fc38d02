"""Choose the prior/proxy combination from the teacher's own tokens, without seeing the teacher's distribution.

Each teacher token y_t was drawn from the hidden distribution p_t, so for any estimate q that does not depend
on y_t, E[-log q_t(y_t)] = H(p_t) + KL(p_t ‖ q_t): the mean negative log-likelihood of the observed tokens ranks
estimates exactly as their mean KL to the teacher does (up to sampling noise). The prior must be queried with
leave-one-out for this to hold (otherwise it has counted y_t already). A proxy trained on the same teacher text
(an aligned proxy) has seen y_t too, which biases the choice towards it; calibrate on records it was not
trained on when you have them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from bayeskd.posterior.combine import combine
from bayeskd.sparse import CONTEXT_COUNT, SparseDist

DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"mode": "log_linear", "a": 1.0, "b": 1.0},
    {"mode": "log_linear", "a": 0.5, "b": 0.5},
    {"mode": "log_linear", "a": 0.3, "b": 0.7},
    {"mode": "log_linear", "a": 0.7, "b": 0.3},
    *({"mode": "mixture", "w": w} for w in (0.1, 0.3, 0.5, 0.7, 0.9)),
    *({"mode": "dirichlet", "c": c} for c in (1.0, 4.0, 16.0, 64.0)),
)


def token_logprob(dist: SparseDist, tokens: torch.Tensor) -> torch.Tensor:
    """log q_t(y_t) per row, float64 [N]: the listed log-probability, or the row's uniform tail share."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.shape != (dist.num_rows,):
        raise ValueError(f"token_logprob: {tuple(tokens.shape)} tokens for {dist.num_rows} rows")
    hit = dist.indices.long() == tokens[:, None]
    listed_lp = torch.where(hit, dist.logprobs.double(), torch.full((), -math.inf, dtype=torch.float64))
    listed_lp = listed_lp.max(dim=1).values
    n_unlisted = (dist.vocab_size - (dist.indices >= 0).sum(dim=1)).clamp(min=1).double()
    tail_lp = dist.tail.double().log() - n_unlisted.log()
    return torch.where(hit.any(dim=1), listed_lp, tail_lp)


def calibrate_combination(prior: SparseDist, proxy: SparseDist | torch.Tensor, teacher_tokens: torch.Tensor, *,
                          candidates: Sequence[dict[str, Any]] = DEFAULT_CANDIDATES, top_k: int | None = None,
                          valid: torch.Tensor | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best settings, table): the `combine` settings among `candidates` whose posterior gives the observed teacher
    tokens the lowest mean negative log-likelihood (nats/token), and every candidate's score, best first.

    `prior`: the prior's rows at the teacher positions, queried with leave-one-out; `proxy`: the proxy's rows (or
    dense logits) at the same positions; `valid`: rows to score (default all). Dirichlet candidates are skipped
    when the prior rows carry no `context_count`. A score of -log 0 (a token the posterior excludes) is +inf."""
    tokens = torch.as_tensor(teacher_tokens, dtype=torch.long)
    if tokens.shape != (prior.num_rows,):
        raise ValueError(f"calibrate_combination: {tuple(tokens.shape)} teacher tokens for {prior.num_rows} rows")
    if not candidates:
        raise ValueError("calibrate_combination: no candidates")
    table = []
    for cand in candidates:
        if cand.get("mode") == "dirichlet" and CONTEXT_COUNT not in prior.extras:
            continue
        post = combine(prior, proxy, top_k=top_k, **cand)
        lp = token_logprob(post, tokens)
        if valid is not None:
            lp = lp[valid]
        table.append({**cand, "nll": float(-lp.mean()) if lp.numel() else math.nan})
    if not table:
        raise ValueError("calibrate_combination: every candidate needs context counts the prior rows lack")
    table.sort(key=lambda r: (math.isnan(r["nll"]), r["nll"]))
    best = {k: v for k, v in table[0].items() if k != "nll"}
    return best, table


def calibrate_on_records(prior, proxy, tokenized, indices: Sequence[int], top_k: int, *,
                         candidates: Sequence[dict[str, Any]] = DEFAULT_CANDIDATES) -> dict[str, Any]:
    """`calibrate_combination` at the response positions of the records `indices` of `tokenized`: the prior
    (an NGramPrior) queried with leave-one-out, the proxy (a ProxyPosterior) through its top-K. Returns
    {"records": how many, "best": settings, "table": every candidate's score}."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("calibration needs at least one record")
    seqs = [tokenized.response_sequences()[i] for i in indices]
    prior_rows = prior.topk(seqs, top_k, leave_one_out=True)
    proxy_rows = proxy.proxy_topk(tokenized, indices, prior.vocab_size)
    tokens = torch.from_numpy(np.concatenate(seqs).astype(np.int64))
    best, table = calibrate_combination(prior_rows, proxy_rows, tokens, candidates=candidates, top_k=top_k)
    return {"records": len(indices), "best": best, "table": table}
