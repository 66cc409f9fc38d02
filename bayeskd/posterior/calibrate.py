"""Choose the prior/proxy combination from the teacher's own tokens, without seeing the teacher's distribution.

Each teacher token y_t was drawn from the hidden distribution p_t, so for any estimate q that does not depend
on y_t, E[-log q_t(y_t)] = H(p_t) + KL(p_t ‖ q_t): the mean negative log-likelihood of the observed tokens ranks
estimates exactly as their mean KL to the teacher does (up to sampling noise). The prior must be queried with
leave-one-out for this to hold (otherwise it has counted y_t already). A proxy trained on the same teacher text
(an aligned proxy) has seen y_t too, which biases the choice towards it.

Cross-fitting (`calibration_indices`): the proxy is scored only on records it was not trained on. `align-proxy`
holds a random slice of the records out of every stage and writes what it trained on into the proxy's directory
(`bayeskd_training.json`: records fingerprint, training and held-out indices). On the same records (same
fingerprint) calibration scores the held-out ones; a proxy trained on all of them, or on other data whose overlap
with these records is unknown, is refused unless forced; a proxy without that file (a base model) is taken as
not trained on the teacher's text and scores the first records. A held-out record may share its prompt with a
training record (several samples per prompt): its response is still an independent draw, so the score is unbiased.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bayeskd.core.combine import combine
from bayeskd.core.sparse import SparseDist
from bayeskd.core.names import CONTEXT_COUNT

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
    return dist.token_logprob(tokens)


def calibrate_combination(prior: SparseDist, proxy: SparseDist | torch.Tensor, teacher_tokens: torch.Tensor, *,
                          candidates: Sequence[dict[str, Any]] = DEFAULT_CANDIDATES, top_k: int | None = None,
                          valid: torch.Tensor | None = None,
                          adaptive: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best settings, table): the `combine` settings among `candidates` whose posterior gives the observed teacher
    tokens the lowest mean negative log-likelihood (nats/token), and every candidate's score, best first.

    `prior`: the prior's rows at the teacher positions, queried with leave-one-out; `proxy`: the proxy's rows (or
    dense logits) at the same positions; `valid`: rows to score (default all). Dirichlet candidates are skipped
    when the prior rows carry no `context_count`. A score of -log 0 (a token the posterior excludes) is +inf.
    `adaptive`: also the "adaptive" mixture (`fit_adaptive`), scored cross-fitted (`adaptive_candidate`)."""
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
    if adaptive and CONTEXT_COUNT in prior.extras:
        table.append(adaptive_candidate(prior, proxy, tokens, valid))
    table.sort(key=lambda r: (math.isnan(r["nll"]), r["nll"]))
    best = {k: v for k, v in table[0].items() if k != "nll"}
    return best, table


def adaptive_candidate(prior: SparseDist, proxy: SparseDist | torch.Tensor, tokens: torch.Tensor,
                       valid: torch.Tensor | None = None) -> dict[str, Any]:
    """The adaptive mixture as a calibration candidate: its weights are fitted, so its score is cross-fitted (fit
    on the first half of the rows, score the second, and the other way round; the halves are contiguous, so
    records rarely straddle them), and the settings are then fitted on all rows."""
    from bayeskd.core.adaptive import adaptive_settings, fit_adaptive

    n = prior.num_rows
    valid = torch.ones(n, dtype=torch.bool) if valid is None else torch.as_tensor(valid, dtype=torch.bool)
    halves = torch.arange(n) < n // 2
    lp = torch.zeros(n, dtype=torch.float64)
    for fit_on in (halves, ~halves):
        part = fit_adaptive(prior, proxy, tokens, valid=valid & fit_on)
        post = combine(prior, proxy, mode="adaptive", theta=part)
        lp = torch.where(~fit_on, token_logprob(post, tokens), lp)
    settings = adaptive_settings(fit_adaptive(prior, proxy, tokens, valid=valid))
    return {"mode": "adaptive", "theta": settings, "nll": float(-lp[valid].mean()) if valid.any() else math.nan}


def calibrate_on_records(prior, proxy, tokenized, indices: Sequence[int], top_k: int, *,
                         candidates: Sequence[dict[str, Any]] = DEFAULT_CANDIDATES) -> dict[str, Any]:
    """`calibrate_combination` at the response positions of the records `indices` of `tokenized`: the prior
    (an NGramPrior) queried with leave-one-out, the proxy (a ProxyPosterior) through its top-K. Returns
    {"records": how many, "best": settings, "table": every candidate's score}."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("calibration needs at least one record")
    all_seqs, all_prompts = tokenized.response_sequences(), tokenized.prompt_sequences()
    seqs = [all_seqs[i] for i in indices]
    prior_rows = prior.topk(seqs, top_k, leave_one_out=True, contexts=[all_prompts[i] for i in indices])
    proxy_rows = proxy.proxy_topk(tokenized, indices, prior.vocab_size)
    tokens = torch.from_numpy(np.concatenate(seqs).astype(np.int64))
    best, table = calibrate_combination(prior_rows, proxy_rows, tokens, candidates=candidates, top_k=top_k)
    return {"records": len(indices), "best": best, "table": table}


# ---------------------------------------------------------------------------------------------------- cross-fitting

TRAINING_INFO = "bayeskd_training.json"  # in a model directory: the teacher records it was trained on
TRAINING_INFO_FORMAT = "bayeskd-training/1"


def index_ranges(indices: Sequence[int]) -> list[list[int]]:
    """Sorted distinct indices as [start, stop) ranges: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    out: list[list[int]] = []
    for i in sorted({int(i) for i in indices}):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def expand_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    """The inverse of `index_ranges`."""
    return [i for lo, hi in ranges for i in range(int(lo), int(hi))]


def read_training_info(proxy) -> dict[str, Any] | None:
    """The `bayeskd_training.json` of a proxy (a directory path, or a model loaded from one), or None when it has
    none (a base model, a hub id)."""
    path = proxy if isinstance(proxy, (str, os.PathLike)) else getattr(proxy, "name_or_path", None)
    if not path or not (Path(path) / TRAINING_INFO).is_file():
        return None
    info = json.loads((Path(path) / TRAINING_INFO).read_text())
    if info.get("format") != TRAINING_INFO_FORMAT:
        raise ValueError(f"{path}/{TRAINING_INFO}: unknown format {info.get('format')!r} "
                         f"(this version reads {TRAINING_INFO_FORMAT!r})")
    return info


def calibration_indices(proxy, fingerprint: str, n_records: int, n: int, *,
                        force: bool = False) -> tuple[list[int], dict[str, Any]]:
    """(record indices, why): the records calibration may score for `proxy` (a path, or a model loaded from one)
    on data of `n_records` records with `records_fingerprint` `fingerprint` (of all the records loaded, before any
    --max-records cut), at most `n` of them.

    - the proxy's `bayeskd_training.json` names these records and holds some out: the held-out ones ("heldout");
    - it names no held-out record here, or other data: ValueError saying why and what to do, unless `force`,
      then the first `n` records ("forced");
    - the proxy has no training info: the first `n` records ("no_training_info").
    `why` is {"rule", "reason", "scored": [start, stop) ranges}, for the summary."""
    info = read_training_info(proxy)
    first = list(range(min(n, n_records)))
    if info is None:
        return first, {"rule": "no_training_info", "scored": index_ranges(first),
                       "reason": f"the proxy carries no {TRAINING_INFO}: taken as not trained on these records"}
    name = getattr(proxy, "name_or_path", proxy)
    if info.get("records_fingerprint") == fingerprint and info.get("records") == n_records:
        heldout = expand_ranges(info.get("heldout", []))[:n]
        if heldout:
            return heldout, {"rule": "heldout", "scored": index_ranges(heldout),
                             "reason": f"the proxy's held-out records ({len(heldout)} scored), never trained on"}
        problem = f"it was trained on all {n_records} records of this data ({info.get('data')})"
    else:
        problem = (f"it was trained on other records ({info.get('records')} records of {info.get('data')}, "
                   f"fingerprint {str(info.get('records_fingerprint'))[:12]}…), which may overlap these")
    if not force:
        raise ValueError(f"{name}: calibration would score the proxy on records it may have been trained on: "
                         f"{problem}. Re-align it with a holdout (align-proxy --holdout-records N), pass "
                         f"--no-calibrate (with --mode/--a/--b/--c/--w), or --calibrate-on-training-records to "
                         f"calibrate on them anyway (biased towards the proxy)")
    return first, {"rule": "forced", "scored": index_ranges(first),
                   "reason": f"--calibrate-on-training-records: {problem}; the choice is biased towards the proxy"}
