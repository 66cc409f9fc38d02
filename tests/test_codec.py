"""The compact shard codec (bayeskd.codec): ids exact, log-probs within the stated bound, tail exact."""
import math

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


# ---------------------------------------------------------------------------------------------------- shards

def _dist(rng, n=40, k=12, v=3001):
    from bayeskd.sparse import SparseDist

    idx, lp, tail = _rows(rng, n, k, v, 3.0, pad_rows=5)
    perm = torch.from_numpy(rng.permutation(k))  # unsorted columns: the writer sorts each row for the codec
    return SparseDist(idx[:, perm], lp[:, perm], tail, v, extras={"context_count": torch.arange(n).float()})


def test_compact_shards_round_trip_and_raw_shards_are_unchanged(rng, tmp_path):
    from bayeskd.sparse import CacheMismatchError, ShardReader, ShardWriter

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
    from bayeskd.sparse import ShardReader, ShardWriter

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
