"""Mode "adaptive" (bayeskd.core.adaptive): the fit recovers a context-dependent gate, combine equals the mixture
with w = σ(θ·f) computed by hand, and the fused loss paths (PyTorch, Triton under the interpreter) match the
reference combine + divergence."""
import importlib
import json
import math
import os
import sys

# as in test_kernels: the Triton kernels run in the interpreter on CPU unless a GPU check asks for compiled ones
INTERPRET = os.environ.get("BAYESKD_KERNELS_COMPILED") != "1"
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decoration of the kernels
    if "bayeskd.kernels.sparse_kd" in sys.modules:
        importlib.reload(sys.modules["bayeskd.kernels.sparse_kd"])

import pytest  # noqa: E402
import torch  # noqa: E402

from bayeskd.losses import linear as LL  # noqa: E402
from bayeskd import losses as L  # noqa: E402
from bayeskd.core.adaptive import (FEATURES, adaptive_features, adaptive_settings, adaptive_weights,  # noqa: E402
                                   fit_adaptive, prior_weights)
from bayeskd.posterior.calibrate import token_logprob  # noqa: E402
from bayeskd.core.combine import combine  # noqa: E402
from bayeskd.core.sparse import SparseDist  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's -inf math


def sparse_from_probs(p: torch.Tensor, k: int) -> SparseDist:
    """The top-k of dense rows p [N, V], the rest as the tail."""
    top = p.topk(k, dim=1)
    return SparseDist(top.indices.int(), top.values.log().float(), (1 - top.values.sum(1)).clamp(min=0).float(),
                      p.shape[1])


def random_sparse(n, v, k, gen, dtype=torch.float64) -> SparseDist:
    """Random rows with distinct indices, some shorter than k (padding), tails in (0.05, 0.85)."""
    idx = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]).int()
    listed = torch.arange(k)[None] < torch.randint(1, k + 1, (n,), generator=gen)[:, None]
    listed[0] = True
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.8 + 0.05
    p = torch.softmax(torch.randn(n, k, generator=gen, dtype=torch.float64).masked_fill(~listed, -math.inf), 1)
    return SparseDist(idx.masked_fill(~listed, -1), (p * (1 - t[:, None])).log().to(dtype), t.to(dtype), v)


def gating_case(n: int, seed: int, v: int = 50, k: int = 12):
    """Prior right (close to the truth) where the context count is high and wrong where it is low; the proxy the
    other way round. Teacher tokens drawn from the truth."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0, 1)
    wrong = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0, 1)
    high = torch.rand(n, generator=g) < 0.5
    counts = torch.where(high, torch.randint(20, 60, (n,), generator=g), torch.randint(0, 3, (n,), generator=g))
    close = 0.9 * truth + 0.1 / v
    prior = sparse_from_probs(torch.where(high[:, None], close, wrong), k)
    prior.extras["context_count"] = counts.float()
    q = torch.where(high[:, None], wrong, close)
    y = torch.multinomial(truth, 1, generator=g).squeeze(1)
    return prior, q, y, high


# ---------------------------------------------------------------------------------------------------------- (a) fit

@pytest.mark.parametrize("online", [False, True])
def test_fit_recovers_the_gate(online):
    seed = 1234
    print(f"seed {seed}")
    prior, q, y, high = gating_case(4000, seed)
    proxy = q.log().float() if online else sparse_from_probs(q, 12)
    valid = torch.ones(len(y), dtype=torch.bool)
    valid[:7] = False
    y[:7] = -100  # masked rows may carry -100
    fit = fit_adaptive(prior, proxy, y, valid)
    w = prior_weights(prior, proxy, fit)
    print(f"online={online}: NLL adaptive {fit['nll']:.4f}, best global w={fit['w_global']:.3f} NLL "
          f"{fit['nll_global']:.4f}; mean w high counts {float(w[high].mean()):.3f}, low {float(w[~high].mean()):.3f}")
    assert fit["rows"] == 3993 and fit["excluded"] == 0 and fit["extras"] == ["context_count"]
    assert float(w[high].mean()) > 0.9 and float(w[~high].mean()) < 0.1
    assert float(w[high].min()) > 0.5 and float(w[~high].max()) < 0.5
    assert fit["nll_global"] - fit["nll"] > 0.3  # measured 0.43 nats/token
    assert fit["theta"][FEATURES.index("log1p_context_count")] > 1.0
    # the fit's NLL is the mean -log of the combined posterior at the teacher tokens (the calibration criterion);
    # the tokens join the support, so an online posterior holds q(y) exactly rather than in its uniform tail
    post = combine(prior[valid], proxy[valid], mode="adaptive", theta=fit, teacher_tokens=y[valid])
    assert abs(-float(token_logprob(post, y[valid]).mean()) - fit["nll"]) < 1e-5
    # deterministic, and the settings survive JSON
    again = fit_adaptive(prior, proxy, y, valid)
    assert again == fit
    assert adaptive_settings(json.loads(json.dumps(fit))) == adaptive_settings(fit)


def test_fit_rejects_and_excludes():
    prior, q, y, _ = gating_case(50, 5)
    proxy = sparse_from_probs(q, 12)
    with pytest.raises(ValueError, match="outside"):
        fit_adaptive(prior, proxy, torch.full_like(y, 50))
    # a row where neither prior nor proxy gives the token any mass is left out and counted
    zero = SparseDist(prior.indices, prior.logprobs, torch.zeros(50), 50, extras=prior.extras)
    zq = SparseDist(proxy.indices, proxy.logprobs, torch.zeros(50), 50)
    unlisted = [t for t in range(50) if t not in set(prior.indices[0].tolist()) | set(proxy.indices[0].tolist())]
    y[0] = unlisted[0]
    fit = fit_adaptive(zero, zq, y)
    assert fit["excluded"] >= 1 and fit["rows"] == 50 - fit["excluded"] and math.isfinite(fit["nll"])


# ---------------------------------------------------------------------------------------------------------- (b) combine

def dense_entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(1)


def hand_features(prior: SparseDist, q_dense: torch.Tensor) -> torch.Tensor:
    cols = [torch.log(1 + prior.extras[k].double()) if k in prior.extras else torch.zeros(prior.num_rows,
                                                                                            dtype=torch.float64)
            for k in ("context_count", "match_length")]
    return torch.stack(cols + [dense_entropy(prior.to_dense(torch.float64)), dense_entropy(q_dense),
                               torch.ones(prior.num_rows, dtype=torch.float64)], 1)


@pytest.mark.parametrize("online", [False, True])
def test_combine_is_the_hand_computed_mixture(online):
    g = torch.Generator().manual_seed(11)
    n, v = 5, 37
    prior = random_sparse(n, v, 6, g)
    prior.extras["context_count"] = torch.tensor([0.0, 1.0, 4.0, 30.0, 200.0])
    prior.extras["match_length"] = torch.tensor([0.0, 2.0, 1.0, 7.0, 3.0])
    proxy = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 if online else random_sparse(n, v, 6, g)
    q = torch.softmax(proxy, 1) if online else proxy.to_dense(torch.float64)
    settings = {"theta": [0.9, -0.4, 0.5, -0.7, 0.2], "features": list(FEATURES), "mean": [1.0, 0.5, 2.0, 2.5, 0.0],
                "std": [1.5, 0.8, 0.6, 0.4, 1.0], "extras": ["context_count", "match_length"]}
    f = hand_features(prior, q)
    torch.testing.assert_close(adaptive_features(prior, proxy), f, rtol=1e-12, atol=1e-12)
    z = (f - torch.tensor(settings["mean"], dtype=torch.float64)) / torch.tensor(settings["std"], dtype=torch.float64)
    w = 1 / (1 + torch.exp(-(z @ torch.tensor(settings["theta"], dtype=torch.float64))))
    assert 0.01 < float(w.min()) < 0.5 < float(w.max()) < 0.999  # the weights differ across rows, none 0 or 1
    torch.testing.assert_close(adaptive_weights(settings, f), w, rtol=1e-12, atol=1e-15)
    p = w[:, None] * prior.to_dense(torch.float64) + (1 - w[:, None]) * q
    y = torch.randint(0, v, (n,), generator=g)
    p = (p + 0.5 * torch.nn.functional.one_hot(y, v)) / 1.5  # teacher-token evidence after the mixture
    got = combine(prior, proxy, mode="adaptive", theta=settings, teacher_tokens=y, evidence=0.5)
    listed = got.indices >= 0
    rows = torch.arange(n)[:, None].expand_as(got.indices)
    torch.testing.assert_close(got.logprobs[listed].exp(), p[rows[listed], got.indices[listed].long()],
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got.tail, 1 - got.logprobs.exp().sum(1), rtol=1e-10, atol=1e-12)
    if not online:  # a sparse proxy's union lists every token whose p differs from the uniform rest
        torch.testing.assert_close(got.to_dense(torch.float64), p, rtol=1e-10, atol=1e-14)
    # a plain θ means unscaled features
    plain = combine(prior, proxy, mode="adaptive", theta=[0.3, 0.0, 0.0, 0.0, -0.2])
    wp = torch.sigmoid(0.3 * f[:, 0] - 0.2)
    if not online:
        pp = wp[:, None] * prior.to_dense(torch.float64) + (1 - wp[:, None]) * q
        torch.testing.assert_close(plain.to_dense(torch.float64), pp, rtol=1e-10, atol=1e-14)


def test_adaptive_errors():
    g = torch.Generator().manual_seed(12)
    prior, proxy = random_sparse(3, 29, 4, g), random_sparse(3, 29, 4, g)
    with pytest.raises(ValueError, match="needs theta"):
        combine(prior, proxy, mode="adaptive")
    with pytest.raises(ValueError, match="needs theta"):
        L.fused_posterior_kd(torch.randn(3, 29), prior, proxy, mode="adaptive")
    with pytest.raises(ValueError, match="5 finite numbers"):
        combine(prior, proxy, mode="adaptive", theta=[1.0, 2.0])
    with pytest.raises(ValueError, match="fit them again"):
        combine(prior, proxy, mode="adaptive", theta={"theta": [0.0] * 5, "features": ["a", "b", "c", "d", "e"]})
    with pytest.raises(ValueError, match="lack"):  # fit with context counts, applied to rows without them
        combine(prior, proxy, mode="adaptive", theta={"theta": [0.0] * 5, "extras": ["context_count"]})
    prior.extras["context_count"] = torch.tensor([1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="context_count"):
        combine(prior, proxy, mode="adaptive", theta=[0.0] * 5)


# ---------------------------------------------------------------------------------------------------------- (c) fused

def fused_case(online: bool, n=7, v=211, k=8, seed=21):
    g = torch.Generator().manual_seed(seed)
    prior = random_sparse(n, v, k, g, torch.float32)
    prior.extras["context_count"] = torch.randint(0, 40, (n,), generator=g).float()
    prior.extras["match_length"] = torch.randint(0, 6, (n,), generator=g).float()
    proxy = torch.randn(n, v, generator=g) * 2 if online else random_sparse(n, v, k, g, torch.float32)
    settings = {"theta": [1.1, 0.4, -0.6, 0.5, 0.1], "features": list(FEATURES), "mean": [2.0, 1.0, 2.5, 3.0, 0.0],
                "std": [1.2, 0.6, 0.5, 0.5, 1.0], "extras": ["context_count"]}
    y = torch.randint(0, v, (n,), generator=g)
    return prior, proxy, settings, y, torch.randn(n, v, generator=g) * 2


def reference(z, prior, proxy, kw, div, T, mask):
    zr = z.detach().double().requires_grad_(True)
    loss = L.sparse_kd_loss(zr, combine(prior, proxy, **kw), div, temperature=T, mask=mask)
    loss.sum().backward()
    return loss.detach(), zr.grad


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_torch_path_matches_reference(online, div):
    prior, proxy, settings, y, z = fused_case(online)
    kw = dict(mode="adaptive", theta=settings, teacher_tokens=y, evidence=0.5)
    mask = torch.tensor([True, False, True, True, True, False, True])
    want, want_grad = reference(z, prior, proxy, kw, div, 0.8, mask)
    leaf = z.clone().requires_grad_(True)
    got = L.fused_posterior_kd_torch(leaf, prior, proxy, divergence=div, temperature=0.8, mask=mask, chunk_rows=3,
                                     **kw)
    got.sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double(), want_grad, rtol=1e-3,
                               atol=2e-6 + 1e-5 * float(want_grad.abs().max()))
    # the weights reach the loss: another θ gives another loss
    other = L.fused_posterior_kd_torch(z, prior, proxy, divergence=div, temperature=0.8, mask=mask,
                                       **{**kw, "theta": {**settings, "theta": [-1.1, 0, 0, 0, 0]}})
    assert float((other - got.detach()).abs().max()) > 1e-3


def test_fused_linear_torch_path_matches_reference():
    prior, proxy, settings, y, _ = fused_case(False)
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(7, 16, generator=g), torch.randn(211, 16, generator=g)
    kw = dict(mode="adaptive", theta=settings, teacher_tokens=y, evidence=0.5)
    want, _ = reference(hidden @ weight.T, prior, proxy, kw, "forward_kl", 1.3, None)
    x = hidden.clone().requires_grad_(True)
    got = LL.fused_linear_posterior_kd(x, weight, prior, proxy, temperature=1.3, chunk_size=4, backend="torch", **kw)
    got.sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-6)
    xr = hidden.double().requires_grad_(True)
    L.sparse_kd_loss(xr @ weight.double().T, combine(prior, proxy, **kw), temperature=1.3).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("online", [False, True])
def test_triton_kernel_matches_reference(online):
    pytest.importorskip("triton")
    dev = torch.device("cpu" if INTERPRET else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("compiled kernels need CUDA")
    prior, proxy, settings, y, z = fused_case(online, n=4, v=257)
    kw = dict(mode="adaptive", theta=settings, teacher_tokens=y, evidence=0.5)
    want, want_grad = reference(z, prior, proxy, kw, "jsd", 1.5, None)
    leaf = z.to(dev).requires_grad_(True)
    got = L.fused_posterior_kd(leaf, prior.to(dev), proxy.to(dev), divergence="jsd", temperature=1.5,
                               backend="triton", **{**kw, "teacher_tokens": y.to(dev)})
    got.sum().backward()
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double().cpu(), want_grad, rtol=1e-3,
                               atol=2e-6 + 1e-5 * float(want_grad.abs().max()))


# ---------------------------------------------------------------------------------------------------------- settings

def test_proxy_posterior_carries_the_settings():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bayeskd.posterior.proxy import ProxyPosterior

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=29, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    with pytest.raises(ValueError, match="needs theta"):
        ProxyPosterior(model, mode="adaptive", top_k=8)
    assert "theta" not in ProxyPosterior(model, mode="mixture", top_k=8).config()  # other configs unchanged
    fit = {"theta": [0.5, 0.0, 0.1, -0.1, 0.0], "nll": 1.0, "nll_global": 1.2}
    post = ProxyPosterior(model, mode="adaptive", top_k=8, theta=fit)
    cfg = json.loads(json.dumps(post.config()))
    assert cfg["mode"] == "adaptive" and cfg["theta"] == adaptive_settings(fit) and "nll" not in cfg["theta"]
    g = torch.Generator().manual_seed(4)
    prior, proxy = random_sparse(6, 29, 5, g, torch.float32), random_sparse(6, 29, 5, g, torch.float32)
    got = post._combine(prior, proxy, [])
    want = combine(prior, proxy, mode="adaptive", theta=fit, top_k=8)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.logprobs, want.logprobs)


def test_calibration_picks_adaptive_when_it_wins_cross_fitted():
    from bayeskd.posterior.calibrate import calibrate_combination

    seed = 77
    print(f"seed {seed}")
    prior, q, y, _ = gating_case(3000, seed)
    best, table = calibrate_combination(prior, sparse_from_probs(q, 12), y, top_k=12)
    assert best["mode"] == "adaptive" and set(best["theta"]) >= {"theta", "mean", "std"}
    scores = {r["mode"]: r["nll"] for r in table}
    fixed = min(r["nll"] for r in table if r["mode"] != "adaptive")
    assert scores["adaptive"] < fixed - 0.05  # held-out halves: not the fit's own rows (dirichlet gates too)
    json.dumps(best)  # saved with the targets
    # without context counts there is nothing to gate on: no adaptive candidate
    plain = SparseDist(prior.indices, prior.logprobs, prior.tail, prior.vocab_size)
    assert all(r["mode"] != "adaptive" for r in calibrate_combination(plain, sparse_from_probs(q, 12), y)[1])
