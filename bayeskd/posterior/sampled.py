"""Sampled targets: S token ids drawn from the estimated posterior per position, stored with their weights.

Top-K truncation moves the unlisted mass into the tail bucket, which biases the student's gradient away from the
full distribution's. A sampled row is unbiased instead (random-sampling KD, arXiv 2503.16870): with ids drawn with
replacement from p and weights w_v = count_v / S, E[w_v] = p(v) for every token, and the forward-KL gradient
w.r.t. the student logits at T = 1, s - w, is linear in the target, so its expectation is the full gradient s - p.
`keep_top` keeps the row's largest entries exactly and samples only the rest (the same estimator on the remainder,
weights scaled by its mass): lower variance for the same storage when the head carries most of the mass.
docs/MATH.md ("Sampled targets") gives the estimator and its variance.
"""
from __future__ import annotations

import torch

from bayeskd.core.sparse import SparseDist, by_probability


def _unlisted(indices: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The u-th (0-based) token id of each row that the row does not list; indices [N, K] (-1 padding), u [N, S]."""
    big = torch.iinfo(torch.int64).max // 2
    srt = torch.sort(torch.where(indices >= 0, indices.long(), big), dim=1).values  # listed ids ascending, pads last
    gaps = srt - torch.arange(srt.shape[1])[None]  # unlisted ids below the j-th listed id
    # the answer is u + (number of listed ids at or below it) = u + #{j : gaps_j <= u}
    return u + torch.searchsorted(gaps.contiguous(), u.contiguous(), right=True)


def sample_targets(dist: SparseDist, samples: int, keep_top: int = 0,
                   generator: torch.Generator | None = None) -> SparseDist:
    """Per row, the `keep_top` largest entries exactly plus `samples` draws (with replacement) from the rest of
    the distribution (the other listed entries and the tail spread uniformly over the unlisted tokens), merged into
    distinct ids with weights; the result lists at most keep_top + samples entries, sorted, with tail 0."""
    if samples < 1 or keep_top < 0:
        raise ValueError(f"sampled targets need samples >= 1 and keep_top >= 0, got {samples}, {keep_top}")
    n, k, v = dist.num_rows, dist.k, dist.vocab_size
    keep_top = min(keep_top, k)
    # the kept head is the first keep_top columns once each row is sorted by descending probability (padding
    # last): SparseDist rows need not come sorted, and sorting costs little next to the draws
    by_p = by_probability(dist.indices, dist.logprobs)
    indices, lp = dist.indices.gather(1, by_p), dist.logprobs.double().gather(1, by_p)
    listed = indices >= 0
    probs = torch.where(listed, lp.exp(), torch.zeros((), dtype=torch.float64))
    head_p = probs[:, :keep_top]
    rest = torch.cat([probs[:, keep_top:], dist.tail.double().clamp(min=0)[:, None]], 1)  # last: the tail bucket
    rest_mass = rest.sum(1)
    has_rest = rest_mass > 0
    draw = torch.multinomial(torch.where(has_rest[:, None], rest, torch.ones_like(rest)), samples, replacement=True,
                             generator=generator)
    from_tail = draw == rest.shape[1] - 1
    cols = (draw + keep_top).clamp(max=k - 1)
    ids = torch.gather(indices.long(), 1, cols)
    unlisted = v - listed.sum(1, keepdim=True)
    if from_tail.any():
        u = (torch.rand(n, samples, generator=generator, dtype=torch.float64) * unlisted).long()
        ids = torch.where(from_tail, _unlisted(indices, u.clamp(max=(unlisted - 1).clamp(min=0))), ids)
    # merge repeated draws: sort the ids of each row, count runs
    ids, _ = torch.sort(ids, dim=1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = torch.cumsum(first, 1) - 1  # run number of each draw within its row
    counts = torch.zeros(n, samples, dtype=torch.float64).scatter_add_(1, run, torch.ones_like(run, dtype=torch.float64))
    run_ids = torch.full((n, samples), -1, dtype=torch.long).scatter_(1, run, ids)
    weights = counts * (rest_mass / samples)[:, None]
    weights = torch.where(has_rest[:, None] & (counts > 0), weights, torch.zeros((), dtype=torch.float64))
    all_ids = torch.cat([indices[:, :keep_top].long(), torch.where(weights > 0, run_ids, -1)], 1)
    all_w = torch.cat([head_p, weights], 1)
    all_lp = torch.where(all_ids >= 0, all_w.log(), torch.full((), float("-inf"), dtype=torch.float64))
    order = torch.argsort(all_lp, dim=1, descending=True, stable=True)
    out_ids = torch.gather(all_ids, 1, order).to(torch.int32)
    out_lp = torch.gather(all_lp, 1, order).float()
    return SparseDist(out_ids, out_lp, torch.zeros(n, dtype=torch.float32), v, dist.temperature, dict(dist.extras))
