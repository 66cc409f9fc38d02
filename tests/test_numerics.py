"""Numerics at the edges (issue 15, item 6): NaN/inf student logits, fp16 logits near the fp16 maximum and large
1/T, all-masked and empty batches, K > V and duplicated entries, empty target shards. Each is a clear error or
the documented behaviour (docs/MATH.md), in the reference loss, the CPU fused path, the Triton kernels (under the
interpreter, tiny shapes), combine and the trainer's loss."""
import importlib
import math
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels' @triton.jit, as in tests/test_kernels.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1" and "bayeskd.kernels.sparse_kd" in sys.modules:  # imported compiled
    importlib.reload(sys.modules["bayeskd.kernels.sparse_kd"])
    if "bayeskd.kernels.fused_linear_sparse_kd" in sys.modules:
        importlib.reload(sys.modules["bayeskd.kernels.fused_linear_sparse_kd"])

from bayeskd.losses import linear as LL  # noqa: E402
import bayeskd.losses as L  # noqa: E402
from bayeskd.core.combine import combine  # noqa: E402
from bayeskd.core.sparse import ShardReader, ShardWriter, SparseDist  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
N, V, K = 5, 24, 4


def _dist(rng, n=N, v=V, k=K) -> SparseDist:
    idx = np.stack([rng.permutation(v)[:k] for _ in range(n)]).astype(np.int32)
    p = rng.dirichlet(np.ones(k + 1), size=n)  # the last share is the tail
    return SparseDist(torch.from_numpy(idx), torch.from_numpy(np.log(p[:, :k])).float(),
                      torch.from_numpy(p[:, k]).float(), v)


def _logits(rng, n=N, v=V, scale=3.0) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((n, v)) * scale).float()


def _triton(z, prior, **kw):
    from bayeskd.kernels.sparse_kd import triton_fused_posterior_kd

    return triton_fused_posterior_kd(z, prior.indices, prior.logprobs, prior.tail, **kw)


# ---------------------------------------------------------------------------------------------------- NaN / inf

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_student_logits_are_a_clear_error(rng, bad):
    prior, proxy, z = _dist(rng), _dist(rng), _logits(rng)
    z[int(rng.integers(N)), int(rng.integers(V))] = bad
    with pytest.raises(ValueError, match="student_logits contains NaN or infinite"):
        L.sparse_kd_loss(z, prior)
    with pytest.raises(ValueError, match="student_logits contains NaN or infinite"):
        L.fused_posterior_kd(z, prior, proxy, backend="torch")
    with pytest.raises(ValueError, match="NaN or infinite values in student_logits"):
        _triton(z, prior, mode="none")
    with pytest.raises(ValueError, match="proxy logits contains NaN or infinite"):
        combine(prior, z)  # online mode: dense proxy logits
    # the lm_head-fused op: a bad hidden state or lm_head weight (was a silent NaN loss on the PyTorch path)
    hidden, weight = _logits(rng, N, 8), _logits(rng, V, 8, scale=0.3)
    hidden[int(rng.integers(N)), int(rng.integers(8))] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        LL.fused_linear_posterior_kd(hidden, weight, prior, backend="torch")
    with pytest.raises(ValueError, match="NaN or infinite"):
        LL.fused_linear_posterior_kd(hidden, weight, prior, backend="triton")


def test_non_finite_targets_are_a_clear_error(rng):
    z, prior = _logits(rng), _dist(rng)
    prior.logprobs[int(rng.integers(N)), int(rng.integers(K))] = math.nan
    with pytest.raises(ValueError, match="target contains NaN or infinite"):
        L.sparse_kd_loss(z, prior)
    with pytest.raises(ValueError, match="prior contains NaN or infinite"):
        L.fused_posterior_kd(z, prior, backend="torch")
    prior = _dist(rng)
    prior.tail[int(rng.integers(N))] = math.inf
    with pytest.raises(ValueError, match="prior contains NaN or infinite"):
        combine(prior, _dist(rng))


# ---------------------------------------------------------------------------------------------------- fp16

@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.05])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_fp16_logits_near_the_fp16_maximum_are_computed_in_fp32(rng, temperature, divergence):
    """fp16 logits up to ±65504 (z/T overflows fp16 for T < 1): every path works in fp32 (the reference in float32,
    the fused paths cast on load) and matches the float64 reference on the same values; the gradient is finite.
    The listed tokens hold the row's maximum by ~1e5, so the student's bucket mass underflows any float: the
    fused CPU path used to return inf for forward KL here (its bucket was exp(z - max) summed to 0)."""
    prior = _dist(rng)
    z = torch.from_numpy(rng.uniform(-65504, -60000, (N, V))).half()
    z.scatter_(1, prior.indices.long()[:, :2], torch.from_numpy(rng.uniform(64000, 65504, (N, 2))).half())
    kw = dict(divergence=divergence, temperature=temperature)
    want = L.sparse_kd_loss(z.double(), prior, **kw)
    assert torch.isfinite(want).all()
    if divergence == "forward_kl" and temperature == 1.0:
        assert want.max() > 1e3  # the underflow regime: the tail's share of a ~1e5 log-gap
    ref32 = L.sparse_kd_loss(z, prior, **kw)
    assert ref32.dtype == torch.float32
    zz = z.clone().requires_grad_(True)
    fused = L.fused_posterior_kd(zz, prior, backend="torch", **kw)
    fused.sum().backward()
    assert torch.isfinite(zz.grad).all()
    for got in (ref32, fused):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_triton_fp16_near_maximum_matches_where_the_bucket_is_resolvable(rng):
    """The Triton kernel forms s_B = (S - S_U)/S against the row max and floors it at 1e-30 (docs/MATH.md): with
    fp16 logits near ±65504 and an outside token within reach of the max, it matches the float64 reference."""
    prior = _dist(rng)
    z = torch.from_numpy(rng.uniform(64000, 65504, (N, V))).half()
    for r in range(N):  # the row's maximum (the fp16 maximum itself) outside U keeps s_B resolvable
        z[r, int(np.setdiff1d(np.arange(V), prior.indices[r].numpy())[0])] = 65504
    want = L.sparse_kd_loss(z.double(), prior, temperature=0.5)
    got = L.fused_posterior_kd(z, prior, temperature=0.5, backend="triton")
    # s_B = (S - S_U)/S: fp32 relative error ~ eps * S / (S - S_U), small with the max outside U
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- masks, N = 0

@pytest.mark.parametrize("backend", ["reference", "torch", "triton", "linear"])
def test_all_masked_batch_is_zero_loss_and_zero_gradient(rng, backend):
    prior, mask = _dist(rng), torch.zeros(N, dtype=torch.bool)
    z = _logits(rng).requires_grad_(True)
    if backend == "linear":
        hidden = _logits(rng, N, 8).requires_grad_(True)
        weight = _logits(rng, V, 8, 0.3).requires_grad_(True)
        loss = LL.fused_linear_posterior_kd(hidden, weight, prior, mask=mask, backend="torch")
        leaves = (hidden, weight)
    else:
        loss = (L.sparse_kd_loss(z, prior, mask=mask) if backend == "reference"
                else L.fused_posterior_kd(z, prior, mask=mask, backend=backend))
        leaves = (z,)
    loss.mean().backward()
    assert torch.equal(loss.detach(), torch.zeros(N)) and not torch.isnan(loss.mean())
    for leaf in leaves:
        assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_empty_batch_gives_empty_results(rng):
    prior = _dist(rng)[:0]
    z = torch.zeros(0, V, requires_grad=True)
    assert L.sparse_kd_loss(z, prior).shape == (0,)
    loss = L.fused_posterior_kd(z, prior, backend="torch")
    loss.sum().backward()
    assert loss.shape == (0,) and z.grad.shape == (0, V)
    out = combine(prior, _dist(rng)[:0])  # was a RuntimeError from max() of an empty tensor
    assert out.num_rows == 0 and out.vocab_size == V


def test_trainer_loss_all_masked_and_non_finite(rng):
    """compute_loss with no response token in the batch: a zero loss whose gradient is zero; NaN logits with
    targets: the fused loss's clear error."""
    from bayeskd.distillation.trainer import BayesKDTrainer

    emb = torch.nn.Embedding(V, V)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=self.emb(input_ids) * self.scale)

    model = Model().train()
    model.scale = 1.0
    cfg = SimpleNamespace(ce_weight=1.0, kd_weight=1.0, fused_backend="torch", world_size=1)
    me = SimpleNamespace(args=cfg, teacher_model=None, proxy_model=None, train_tokens=0, response_tokens=0,
                         _acc={"ce_loss": 0.0, "kd_loss": 0.0, "n": 0, "kd_n": 0})
    ids = torch.from_numpy(rng.integers(0, V, (2, 6)))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.zeros_like(ids).bool()}
    loss = BayesKDTrainer.compute_loss(me, model, batch)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(emb.weight.grad, torch.zeros_like(emb.weight))
    rmask = torch.zeros_like(ids).bool()
    rmask[:, 3:] = True
    t = _dist(rng, n=int(rmask[:, 1:].sum()))
    batch.update(response_mask=rmask, target_indices=t.indices, target_logprobs=t.logprobs, target_tail=t.tail)
    assert torch.isfinite(BayesKDTrainer.compute_loss(me, model, batch))
    model.scale = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        BayesKDTrainer.compute_loss(me, model, batch)


# ---------------------------------------------------------------------------------------------------- K > V

def test_k_larger_than_v_and_duplicated_entries_are_refused(rng):
    """A row lists at most V distinct tokens: K > V is refused by every path (as SparseDist.validate and the
    kernel already did), and a token listed twice (which would count its mass twice) is refused too."""
    z, v = _logits(rng, v=6), 6
    idx = np.stack([np.concatenate([rng.permutation(v), [-1, -1]]) for _ in range(N)]).astype(np.int32)
    lp = np.where(idx >= 0, -math.log(v), -np.inf)
    wide = SparseDist(torch.from_numpy(idx), torch.from_numpy(lp).float(), torch.zeros(N), v)
    for call in (lambda: L.sparse_kd_loss(z, wide), lambda: combine(wide),
                 lambda: L.fused_posterior_kd(z, wide, backend="torch"),
                 lambda: L.fused_posterior_kd(z, wide, backend="triton")):
        with pytest.raises(ValueError, match="K=8 is larger than the vocabulary size V=6"):
            call()
    dup = _dist(rng, v=6)
    dup.indices[2, 1] = dup.indices[2, 0]
    for call in (lambda: L.sparse_kd_loss(z, dup), lambda: combine(dup),
                 lambda: L.fused_posterior_kd(z, dup, backend="torch")):
        with pytest.raises(ValueError, match="lists the same token index twice"):
            call()


# ---------------------------------------------------------------------------------------------------- shards

def test_empty_shard_reads_as_zero_rows(rng, tmp_path):
    """A shard with 0 rows (e.g. a record shard whose responses were all empty) is written and read back."""
    w = ShardWriter(tmp_path, vocab_size=V, k=K, tokenizer_fingerprint="fp")
    full = _dist(rng, n=3)
    w.write("shard-00000", _dist(rng)[:0])
    w.write("shard-00001", full)
    if hasattr(w, "close"):
        w.close()
    got = list(ShardReader(tmp_path, vocab_size=V, k=K))
    assert [d.num_rows for d, _ in got] == [0, 3]
    assert got[0][0].indices.shape == (0, K) and torch.equal(got[1][0].indices, full.indices)
