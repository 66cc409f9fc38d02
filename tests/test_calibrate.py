"""Choosing the prior/proxy combination from the teacher's sampled tokens (bayeskd.posterior.calibrate)."""
import math

import pytest
import torch

from bayeskd.posterior.calibrate import calibrate_combination, token_logprob
from bayeskd.evaluation.metrics import kl_teacher_to_estimate
from bayeskd.core.combine import combine
from bayeskd.core.sparse import SparseDist


def _sparse(lp: torch.Tensor, k: int) -> SparseDist:
    top = lp.topk(k, dim=-1)
    tail = (1 - top.values.exp().sum(-1)).clamp(min=0)
    return SparseDist(top.indices.to(torch.int32), top.values.float(), tail.float(), lp.shape[-1])


def test_token_logprob_hand_case():
    d = SparseDist(torch.tensor([[2, 0, -1], [1, -1, -1]], dtype=torch.int32),
                   torch.tensor([[math.log(0.5), math.log(0.2), -math.inf], [math.log(0.4), -math.inf, -math.inf]]),
                   torch.tensor([0.3, 0.6]), 5)
    got = token_logprob(d, torch.tensor([0, 3]))
    # row 0: token 0 is listed at 0.2; row 1: token 3 is unlisted, tail 0.6 over 4 unlisted tokens
    torch.testing.assert_close(got, torch.tensor([math.log(0.2), math.log(0.15)], dtype=torch.float64))
    got = token_logprob(d, torch.tensor([4, 1]))
    torch.testing.assert_close(got, torch.tensor([math.log(0.3 / 3), math.log(0.4)], dtype=torch.float64))
    with pytest.raises(ValueError, match="tokens for 2 rows"):
        token_logprob(d, torch.tensor([0]))


def test_calibration_ranks_like_the_kl_it_cannot_see():
    seed = int(torch.randint(0, 2**31, (1,)))
    print(f"seed {seed}")  # a failure can be replayed with it
    g = torch.Generator().manual_seed(seed)
    n, v, k = 4000, 50, 50
    teacher = torch.log_softmax(2.0 * torch.randn(n, v, generator=g), -1)
    # two noisy views of the teacher: the best combination is a real mixture of both
    prior = _sparse(torch.log_softmax(teacher + 1.2 * torch.randn(n, v, generator=g), -1), k)
    proxy = _sparse(torch.log_softmax(teacher + 1.2 * torch.randn(n, v, generator=g), -1), k)
    tokens = torch.multinomial(teacher.exp(), 1, generator=g).squeeze(1)
    cands = [{"mode": "log_linear", "a": 1.0, "b": 1.0}, {"mode": "mixture", "w": 0.5},
             {"mode": "mixture", "w": 0.0}, {"mode": "mixture", "w": 1.0}, {"mode": "dirichlet", "c": 1.0}]
    best, table = calibrate_combination(prior, proxy, tokens, candidates=cands)
    assert [r["nll"] for r in table] == sorted(r["nll"] for r in table)
    assert all(r["mode"] != "dirichlet" for r in table)  # no context counts in these prior rows: skipped
    kl = {i: float(kl_teacher_to_estimate(teacher, combine(prior, proxy, **c)).mean())
          for i, c in enumerate(cands[:4])}
    assert best == cands[min(kl, key=kl.get)]  # the NLL of sampled tokens picks the lowest hidden KL
    assert best == {"mode": "mixture", "w": 0.5}


def test_calibration_rejects_bad_input():
    d = SparseDist(torch.tensor([[0]], dtype=torch.int32), torch.tensor([[0.0]]), torch.tensor([0.0]), 3)
    with pytest.raises(ValueError, match="teacher tokens"):
        calibrate_combination(d, d, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context counts"):
        calibrate_combination(d, d, torch.tensor([0]), candidates=[{"mode": "dirichlet", "c": 1.0}])
