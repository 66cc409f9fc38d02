"""The compact shard codec (bayeskd.codec): ids exact, log-probs within the stated bound, tail exact."""
import math

import numpy as np
import pytest
import torch

from bayeskd.codec import decode, default_logprob_bits, encode, id_bits


def _rows(rng, n, k, v, scale, pad_rows=0, tails=None):
    """Top-k rows of random softmaxes (sorted, normalised), the last `pad_rows` rows partly padded."""
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * scale, -1)
    top, idx = lp.topk(k, dim=1)
    idx = idx.int()
    tail = (1 - top.exp().sum(1)).clamp(min=0)
    for r in range(n - pad_rows, n):
        keep = int(rng.integers(0, k))
        idx[r, keep:] = -1
        top[r, keep:] = -math.inf
        tail[r] = 1 - top[r, :keep].exp().sum() if keep else 1.0
    if tails is not None:  # force tails: rescale the listed part so the row stays normalised
        listed = idx >= 0
        mass = torch.where(listed, top.exp(), 0).sum(1)
        top = torch.where(listed, top + torch.log((1 - tails) / mass)[:, None], top)
        tail = tails
    return idx, top, tail.float()


def _kl(lp, lp2):
    listed = torch.isfinite(lp)
    p = torch.where(listed, lp.double().exp(), 0)
    return torch.where(listed, p * (lp.double() - lp2.double()), 0).sum(1)


@pytest.mark.parametrize("v,k,scale", [(1, 1, 1.0), (2, 1, 1.0), (301, 7, 2.0), (517, 64, 4.0), (4099, 64, 9.0),
                                       (262144, 16, 3.0)])
def test_round_trip_ids_exact_logprobs_within_bound(rng, v, k, scale):
    idx, lp, tail = _rows(rng, 97, k, v, scale, pad_rows=11 if k > 1 else 0)
    tensors, params = encode(idx, lp, tail, v)
    idx2, lp2, tail2 = decode(tensors, params)
    assert torch.equal(idx2, idx)
    assert torch.equal(tail2, tail)  # the tail is stored exactly
    assert torch.equal(torch.isfinite(lp2), torch.isfinite(lp))  # padding stays -inf, listed stays finite
    kl = _kl(lp, lp2)
    assert kl.max() <= 1e-3, f"KL {kl.max():.2e}"
    listed = idx >= 0  # listed mass is 1 - tail again
    mass = torch.where(listed, lp2.double().exp(), 0).sum(1)
    has = listed.any(1)
    assert torch.allclose(mass[has], 1 - tail[has].double(), atol=1e-5)
    bits = id_bits(v) + default_logprob_bits(v)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload <= math.ceil(listed.sum().item() * bits / 8) + 2 + 6 * idx.shape[0]


def test_three_bytes_an_entry_at_k64_for_large_vocabularies(rng):
    for v in (32000, 151936, 262144):
        idx, lp, tail = _rows(rng, 64, 64, v, 6.0)
        tensors, _ = encode(idx, lp, tail, v)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) / idx.numel() <= 3.0


@pytest.mark.parametrize("tail_value", [0.0, 1 - 1e-6, 0.3])
def test_tails_zero_and_near_one_are_kept_exactly(rng, tail_value):
    tail = torch.full((20,), tail_value, dtype=torch.float32)
    idx, lp, tail = _rows(rng, 20, 8, 1000, 3.0, tails=tail)
    idx2, lp2, tail2 = decode(*encode(idx, lp, tail, 1000))
    assert torch.equal(tail2, tail) and torch.equal(idx2, idx)
    assert _kl(lp, lp2).max() <= 1e-3


def test_unnormalised_rows_keep_their_offsets(rng):
    idx, lp, tail = _rows(rng, 30, 8, 500, 2.0)
    lp = lp - 0.5  # listed + tail < 1: a decoder that renormalised would move every entry by 0.5
    tensors, params = encode(idx, lp, tail, 500)
    assert "compact.offsets" in tensors
    _, lp2, _ = decode(tensors, params)
    assert (lp2 - lp).abs().max() < 0.05


def test_bad_rows_and_bad_streams_are_refused(rng):
    idx, lp, tail = _rows(rng, 5, 4, 100, 1.0)
    with pytest.raises(ValueError, match="sorted in descending order"):
        encode(idx, lp.flip(1), tail, 100)
    holes = idx.clone()
    holes[0, 1] = -1
    with pytest.raises(ValueError, match="padding"):
        encode(holes, lp, tail, 100)
    tensors, params = encode(idx, lp, tail, 100)
    short = dict(tensors, **{"compact.ids": tensors["compact.ids"][:-1]})
    with pytest.raises(ValueError, match="shorter"):
        decode(short, params)
    with pytest.raises(ValueError, match="codec"):
        decode(tensors, {**params, "codec_version": 99})


def _rows_with_zeros(rng, n, k, v, normalised):
    """float32 rows as `encode` takes them, built to be hard: ties, gaps up to 1e5 nats, listed entries at -inf
    (probability exactly 0, after the finite ones), rows of -inf only, empty rows, tails 0 or not."""
    idx = torch.full((n, k), -1, dtype=torch.int32)
    lp = torch.full((n, k), -math.inf, dtype=torch.float32)
    tail = torch.ones(n, dtype=torch.float32)
    for r in range(n):
        listed = int(rng.integers(0, k + 1))
        nf = int(rng.integers(0, listed + 1)) if rng.random() < 0.5 else listed
        idx[r, :listed] = torch.from_numpy(rng.choice(v, size=listed, replace=False).astype(np.int32))
        if nf == 0:
            continue
        gaps = rng.exponential(float(rng.choice([0.05, 1.0, 5.0])), nf - 1)
        gaps[rng.random(nf - 1) < 0.3] = 0.0  # ties
        if nf > 1 and rng.random() < 0.3:
            gaps[rng.integers(nf - 1)] = 10 ** rng.uniform(2, 5)  # a huge gap
        x = np.concatenate([[0.0], np.cumsum(gaps)])
        t = 0.0 if rng.random() < 0.3 else float(rng.uniform(0, 0.9))
        row = -x - (np.logaddexp.reduce(-x) - math.log(1 - t)) - (0.0 if normalised else 0.5)
        lp[r, :nf] = torch.from_numpy(row.astype(np.float32))
        tail[r] = t
    return idx, lp, tail


def _largest_step(lp_row: np.ndarray, bits: int) -> float:
    """The codec's no-clipping step for a row's finite entries (its docstring): 2^(e/8), e the least int >= 8
    log2(largest gap / (2^b - 2)), e in [-128, 127]."""
    gap = float(np.max(-np.diff(lp_row), initial=0.0))
    return 2.0 ** (min(127, max(-128, math.ceil(8 * math.log2(max(gap / (2**bits - 2), 1e-30))))) / 8)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_zero_probability_entries_round_trip_exactly(seed):
    """decode(encode(x)) keeps ids and every -inf exactly, gives no NaN or +inf, and each row's finite entries
    keep within the documented error: p-weighted variance of the log-probability error <= s_hi^2 / 4."""
    rng = np.random.default_rng(seed)
    v = int(rng.choice([3, 7, 101, 4099, 262143]))
    k = min(v, int(rng.integers(1, 25)))
    bits = None if seed % 2 else int(rng.integers(2, 17))
    normalised = seed % 3 != 2  # unnormalised shards store per-row offsets
    idx, lp, tail = _rows_with_zeros(rng, 300, k, v, normalised)
    tensors, params = encode(idx, lp, tail, v, bits)
    idx2, lp2, tail2 = decode(tensors, params)
    assert torch.equal(idx2, idx) and torch.equal(tail2, tail)
    assert not torch.isnan(lp2).any() and not (lp2 == math.inf).any()
    assert torch.equal(lp2 == -math.inf, lp == -math.inf)  # padding and zero-probability entries, nothing else
    assert ("compact.offsets" in tensors) == (not normalised)
    b = params["logprob_bits"]
    for r in range(len(idx)):
        fin = torch.isfinite(lp[r])
        if not fin.any():
            continue
        a, a2 = lp[r, fin].double().numpy(), lp2[r, fin].double().numpy()
        p = np.exp(a - a.max())
        p /= p.sum()
        err = a2 - a
        var = float(p @ (err - p @ err) ** 2)
        assert var <= _largest_step(a, b) ** 2 / 4 * (1 + 1e-6) + 1e-10, (r, var, a, a2)
        if normalised and tail[r] < 1:  # the decoder puts the listed mass back at 1 - tail
            assert np.exp(a2).sum() == pytest.approx(1 - float(tail[r]), abs=1e-5)


def test_the_audited_zero_probability_row():
    """Issue 27: [log .7, log .3, -inf] with tail 0 decoded to [inf, inf, inf]."""
    idx, lp = torch.tensor([[3, 1, 2]]), torch.tensor([[math.log(0.7), math.log(0.3), -math.inf]])
    tensors, params = encode(idx, lp, torch.zeros(1), 10)
    idx2, lp2, _ = decode(tensors, params)
    assert torch.equal(idx2, idx.int()) and lp2[0, 2] == -math.inf
    assert torch.allclose(lp2[0, :2].exp(), torch.tensor([0.7, 0.3]), atol=1e-3)
    assert params["codec_version"] == 2 and tensors["compact.finite"].tolist() == [2]


def test_rows_without_zeros_keep_the_version_1_format():
    """Only shards with -inf entries need the finite counts; the others are written exactly as version 1 was, so
    readers of version 1 still read them."""
    idx, lp, tail = _rows(np.random.default_rng(11), 20, 8, 1000, 3.0, pad_rows=5)
    tensors, params = encode(idx, lp, tail, 1000)
    assert params["codec_version"] == 1 and "compact.finite" not in tensors


def test_logprob_bits_out_of_range_are_named():
    idx, lp, tail = _rows(np.random.default_rng(12), 5, 4, 100, 1.0)
    for bits in (0, 1, 17):
        with pytest.raises(ValueError, match=f"logprob_bits must be in 2..16, got {bits}"):
            encode(idx, lp, tail, 100, logprob_bits=bits)
    nan = lp.clone()
    nan[2, 1] = math.nan
    with pytest.raises(ValueError, match="row 2 lists a NaN"):
        encode(idx, nan, tail, 100)
    for bits in (2, 16):  # the ends of the range work
        idx2, lp2, _ = decode(*encode(idx, lp, tail, 100, logprob_bits=bits))
        assert torch.equal(idx2, idx) and torch.isfinite(lp2).all()


# ---------------------------------------------------------------------------------------------------- shards

def _dist(rng, n=40, k=12, v=3001):
    from bayeskd.core.sparse import SparseDist

    idx, lp, tail = _rows(rng, n, k, v, 3.0, pad_rows=5)
    perm = torch.from_numpy(rng.permutation(k))  # unsorted columns: the writer sorts each row for the codec
    return SparseDist(idx[:, perm], lp[:, perm], tail, v, extras={"context_count": torch.arange(n).float()})


def test_compact_shards_round_trip_and_raw_shards_are_unchanged(rng, tmp_path):
    from bayeskd.core.sparse import CacheMismatchError, ShardReader, ShardWriter

    d = _dist(rng)
    raw = ShardWriter(tmp_path / "raw", d.vocab_size, d.k, "fp")
    raw.write("s0", d, extra={"lengths": torch.tensor([3, 4])})
    comp = ShardWriter(tmp_path / "comp", d.vocab_size, d.k, "fp", codec="compact")
    comp.write("s0", d, extra={"lengths": torch.tensor([3, 4])})
    assert raw.manifest["version"] == 1 and "codec" not in raw.manifest  # what older readers expect
    assert comp.manifest["version"] == 2 and comp.manifest["codec"] == "compact"
    assert (tmp_path / "comp" / "s0.safetensors").stat().st_size < (tmp_path / "raw" / "s0.safetensors").stat().st_size
    a, ea = ShardReader(tmp_path / "raw").read("s0.safetensors")
    b, eb = ShardReader(tmp_path / "comp").read("s0.safetensors")
    assert torch.equal(eb["lengths"], ea["lengths"]) and torch.equal(b.extras["context_count"], a.extras["context_count"])
    assert torch.equal(b.tail, a.tail)
    dense_a, dense_b = a.to_dense(torch.float64), b.to_dense(torch.float64)  # same distribution, entries re-sorted
    kl = (dense_a * (dense_a.clamp(min=1e-300).log() - dense_b.clamp(min=1e-300).log())).sum(1)
    assert kl.max() <= 1e-3
    with pytest.raises(CacheMismatchError, match="codec"):  # a resume must not mix formats
        ShardWriter(tmp_path / "comp", d.vocab_size, d.k, "fp")


def test_a_damaged_compact_shard_is_named(rng, tmp_path):
    from bayeskd.integrity import CorruptOutputError
    from bayeskd.core.sparse import ShardReader, ShardWriter

    d = _dist(rng)
    ShardWriter(tmp_path, d.vocab_size, d.k, "fp", codec="compact").write("s0", d)
    path = tmp_path / "s0.safetensors"
    data = bytearray(path.read_bytes())
    at = int(rng.integers(len(data) // 2, len(data)))
    print(f"flipping byte {at}")
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptOutputError, match="s0.safetensors: checksum mismatch"):
        ShardReader(tmp_path).read("s0.safetensors")


def test_compact_shard_with_padding_before_a_zero_probability_entry(tmp_path):
    """A valid row may list a revealed probability of 0 (-inf) after padding; the writer sorts padding last so the
    codec takes it (it refused the row as 'padding must come after every listed entry')."""
    from bayeskd.core.sparse import ShardReader, ShardWriter, SparseDist

    ninf = float("-inf")
    d = SparseDist(indices=torch.tensor([[4, -1, 2, 7], [1, 3, -1, -1]], dtype=torch.int32),
                   logprobs=torch.tensor([[math.log(0.6), ninf, math.log(0.3), ninf],
                                          [math.log(0.5), math.log(0.5), ninf, ninf]]),
                   tail=torch.tensor([0.1, 0.0]), vocab_size=11)
    w = ShardWriter(tmp_path / "comp", 11, 4, "fp", codec="compact")
    w.write("s0", d)
    back, _ = ShardReader(tmp_path / "comp").read("s0.safetensors")
    row = {int(i): float(lp) for i, lp in zip(back.indices[0], back.logprobs[0]) if i >= 0}
    assert row.keys() == {4, 2, 7} and row[7] == ninf
    assert row[4] == pytest.approx(math.log(0.6), abs=2e-3) and row[2] == pytest.approx(math.log(0.3), abs=2e-3)
    assert (back.indices[0] == -1).sum() == 1 and torch.equal(back.tail, d.tail)
