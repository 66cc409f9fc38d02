"""SparseDist semantics, validation, and the shard format (round trip, atomicity, resume, refusal, checksums)."""
import json
import os

import numpy as np
import pytest
import torch

from bayeskd.core.sparse import (CacheMismatchError, ShardReader, ShardWriter, SparseDist, read_manifest,
                                 tokenizer_fingerprint)
from bayeskd.integrity import atomic_write_bytes


def random_dist(rng, n=16, k=8, v=50, complete=True, dtype=torch.float32, extras=True) -> SparseDist:
    """Random rows: each lists between 1 and K distinct tokens (the rest padding); with `complete`, listed
    mass + tail = 1, else a random total below 1."""
    indices = np.full((n, k), -1, dtype=np.int32)
    logprobs = np.full((n, k), -np.inf, dtype=np.float32)
    tail = np.empty(n, dtype=np.float32)
    for i in range(n):
        m = int(rng.integers(1, k + 1))
        indices[i, :m] = rng.choice(v, size=m, replace=False)
        w = rng.dirichlet(np.ones(m + 1))
        if m == v:  # every token listed: no tail is possible
            w = np.append(w[:m] / w[:m].sum(), 0.0)
        total = 1.0 if complete else rng.uniform(0.2, 0.9)
        logprobs[i, :m] = np.log(w[:m] * total)
        tail[i] = w[m] * total
    ex = {"context_count": torch.from_numpy(rng.integers(0, 100, n).astype(np.int64))} if extras else {}
    return SparseDist(torch.from_numpy(indices), torch.from_numpy(logprobs).to(dtype), torch.from_numpy(tail), v,
                      float(rng.uniform(0.5, 2.0)), ex)


def assert_dist_equal(a: SparseDist, b: SparseDist) -> None:
    assert (a.vocab_size, a.k, a.temperature) == (b.vocab_size, b.k, b.temperature)
    assert torch.equal(a.indices, b.indices) and a.indices.dtype == b.indices.dtype
    assert torch.equal(a.logprobs, b.logprobs) and a.logprobs.dtype == b.logprobs.dtype
    assert torch.equal(a.tail, b.tail)
    assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


# ----------------------------------------------------------------------------------------------- SparseDist

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_dense_sums_to_one_and_spreads_the_tail(rng, dtype):
    d = random_dist(rng, n=32, k=8, v=40, dtype=dtype)
    d.validate(atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    dense = d.to_dense(torch.float64)
    assert dense.shape == (32, 40) and (dense >= 0).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(dense.sum(1), torch.ones(32, dtype=torch.float64), atol=tol, rtol=0)
    for i in range(32):
        listed = d.indices[i][d.indices[i] >= 0].long()
        torch.testing.assert_close(dense[i, listed], d.logprobs[i][: len(listed)].double().exp())
        others = torch.ones(40, dtype=torch.bool)
        others[listed] = False
        expected = d.tail[i].double() / (40 - len(listed))
        torch.testing.assert_close(dense[i, others], expected.expand(int(others.sum())))


def test_to_dense_with_every_token_listed_and_incomplete_mass(rng):
    v = 6
    d = random_dist(rng, n=4, k=v, v=v, extras=False)
    d.indices[:] = torch.stack([torch.randperm(v, generator=torch.Generator().manual_seed(i)) for i in range(4)]).int()
    d.logprobs[:] = torch.log_softmax(torch.from_numpy(rng.standard_normal((4, v))), 1).float()
    d.tail[:] = 0
    torch.testing.assert_close(d.validate().to_dense().sum(1), torch.ones(4))
    partial = random_dist(rng, n=8, k=4, v=30, complete=False)
    dense = partial.validate().to_dense()
    mass = torch.where(partial.indices >= 0, partial.logprobs.exp(), 0).sum(1) + partial.tail
    torch.testing.assert_close(dense.sum(1), mass)  # to_dense preserves an incomplete mass; it does not renormalize
    assert (dense.sum(1) < 0.95).all()


def test_padding_rows_and_num_listed(rng):
    d = random_dist(rng, n=10, k=5, v=20)
    d.indices[3] = -1
    d.logprobs[3] = float("-inf")
    d.tail[3] = 1.0  # a row with nothing listed: the whole mass is spread uniformly
    d.validate()
    assert d.num_listed()[3] == 0 and (d.num_listed() == (d.indices >= 0).sum(1)).all()
    torch.testing.assert_close(d.to_dense()[3], torch.full((20,), 1 / 20))
    # A padding slot that carries a finite logprob is refused.
    d.logprobs[3, 0] = -1.0
    with pytest.raises(ValueError, match="padding slots"):
        d.validate()


def _bad(rng, what: str) -> SparseDist:
    d = random_dist(rng, n=8, k=4, v=12)
    row = int(rng.integers(0, 8))
    if what == "nan":
        d.logprobs[row, 0] = float("nan")
    elif what == "nan_tail":
        d.tail[row] = float("nan")
    elif what == "index_ge_v":
        d.indices[row, 0] = 12
    elif what == "index_below_pad":
        d.indices[row, 0] = -2
    elif what == "duplicate":
        d.indices[row] = torch.tensor([5, 5, -1, -1], dtype=torch.int32)  # otherwise a valid row
        d.logprobs[row] = torch.log(torch.tensor([0.1, 0.1, 0.0, 0.0]))
        d.tail[row] = 0.8
    elif what == "mass_gt_1":
        d.tail[row] += 0.2
    elif what == "positive_logprob":
        d.logprobs[row, 0] = 0.5
    elif what == "negative_tail":
        d.tail[row] = -0.1
    elif what == "k_gt_v":
        return SparseDist(torch.full((2, 13), -1, dtype=torch.int32), torch.full((2, 13), float("-inf")),
                          torch.ones(2), 12)
    elif what == "int64_indices":
        return SparseDist(d.indices.long(), d.logprobs, d.tail, d.vocab_size)
    elif what == "shape":
        return SparseDist(d.indices, d.logprobs[:, :3], d.tail, d.vocab_size)
    elif what == "tail_shape":
        return SparseDist(d.indices, d.logprobs, d.tail[:5], d.vocab_size)
    return d


@pytest.mark.parametrize("what,message", [
    ("nan", "NaN or infinite"), ("nan_tail", "NaN or infinite"), ("index_ge_v", r"token index 12 outside \[0, V=12\)"),
    ("index_below_pad", "token index -2 outside"), ("duplicate", "same token index twice"),
    ("mass_gt_1", r"total mass .* > 1"), ("positive_logprob", "above 0"), ("negative_tail", "negative tail"),
    ("k_gt_v", "K=13 is larger than the vocabulary size V=12"), ("int64_indices", "indices must be int32"),
    ("shape", "must both be"), ("tail_shape", "tail has shape"),
])
def test_validate_catches_each_problem(rng, what, message):
    random_dist(rng, n=8, k=4, v=12).validate()  # the unmodified distribution is fine
    with pytest.raises(ValueError, match=message):
        _bad(rng, what).validate(name="targets")


def test_validate_names_the_row_with_too_much_mass(rng):
    d = random_dist(rng, n=8, k=4, v=12)
    d.tail[6] += 0.5
    with pytest.raises(ValueError, match=r"prior: row 6 has total mass"):
        d.validate(name="prior")


def test_slicing_cat_and_to(rng):
    a, b = random_dist(rng, n=5), random_dist(rng, n=7)
    b.temperature = a.temperature
    c = SparseDist.cat([a, b])
    assert len(c) == 12 and c.num_rows == 12
    assert_dist_equal(c[:5], a)
    assert_dist_equal(c[5:], b)
    assert c[torch.tensor([1, 3])].extras["context_count"].tolist() == a.extras["context_count"][[1, 3]].tolist()
    half = c.to(dtype=torch.bfloat16)
    assert half.logprobs.dtype == torch.bfloat16 and half.indices.dtype == torch.int32
    with pytest.raises(ValueError, match="cannot concatenate"):
        SparseDist.cat([a, random_dist(rng, n=3, k=4)])
    with pytest.raises(ValueError):
        SparseDist.cat([])


def test_tokenizer_fingerprint(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    assert tokenizer_fingerprint(tiny_tokenizer) == tokenizer_fingerprint(vocab)
    changed = dict(vocab)
    a, b = list(changed)[:2]
    changed[a], changed[b] = changed[b], changed[a]  # same tokens, two ids swapped
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(vocab)


# ----------------------------------------------------------------------------------------------- shards

FP = "f" * 64
CONFIG = {"mode": "log_linear", "a": 1.0, "b": 1.0, "order": 4}


def _writer(path, v=50, k=8, fp=FP, config=CONFIG) -> ShardWriter:
    return ShardWriter(path, vocab_size=v, k=k, tokenizer_fingerprint=fp, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_round_trip_with_extras(tmp_path, rng, dtype):
    w = _writer(tmp_path)
    dists = [random_dist(rng, n=int(rng.integers(1, 30)), dtype=dtype) for _ in range(3)]
    token_pos = [torch.from_numpy(rng.integers(0, 1000, len(d))) for d in dists]
    for i, (d, pos) in enumerate(zip(dists, token_pos)):
        path = w.write(f"shard-{i:05d}", d, extra={"position": pos})
        assert path.exists() and w.has_shard(f"shard-{i:05d}")
    r = ShardReader(tmp_path, vocab_size=50, k=8, tokenizer_fingerprint=FP, config=CONFIG)
    assert r.shard_names == [f"shard-{i:05d}.safetensors" for i in range(3)]
    for (got, extra), d, pos in zip(r, dists, token_pos):
        assert_dist_equal(got, d)
        assert extra.keys() == {"position"} and torch.equal(extra["position"], pos)
    manifest = read_manifest(tmp_path)
    assert [s["rows"] for s in manifest["shards"].values()] == [len(d) for d in dists]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_writing_a_slice_of_a_larger_dist(tmp_path, rng):
    d = random_dist(rng, n=20)
    part = d[5:9]  # views into d's storage
    _writer(tmp_path).write("part", part)
    got, _ = ShardReader(tmp_path).read("part.safetensors")
    assert_dist_equal(got, part)


def test_shard_with_wrong_k_or_v_is_refused(tmp_path, rng):
    w = _writer(tmp_path)
    with pytest.raises(ValueError, match="does not match the manifest"):
        w.write("x", random_dist(rng, k=4))
    with pytest.raises(ValueError, match="does not match the manifest"):
        w.write("x", random_dist(rng, v=60))


def test_failed_write_leaves_no_partial_file_and_keeps_old_data(tmp_path, rng, monkeypatch):
    w = _writer(tmp_path)
    first = random_dist(rng)
    w.write("s0", first)
    manifest_before = (tmp_path / "manifest.json").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the process "dies"
            f.write(b"partial")
        raise KeyboardInterrupt

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", crash)  # what the atomic writer calls
    with pytest.raises(KeyboardInterrupt):
        w.write("s1", random_dist(rng))
    with pytest.raises(KeyboardInterrupt):
        w.write("s0", random_dist(rng))  # overwriting an existing shard fails too
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "s0.safetensors"]
    assert (tmp_path / "manifest.json").read_bytes() == manifest_before
    got, _ = ShardReader(tmp_path).read("s0.safetensors")  # checksum still matches: the old shard is intact
    assert_dist_equal(got, first)


def test_atomic_write_bytes_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails inside the write
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.json"]


def test_resume_keeps_finished_shards(tmp_path, rng):
    w = _writer(tmp_path)
    dists = {f"s{i}": random_dist(rng) for i in range(3)}
    for name, d in dists.items():
        w.write(name, d)
    os.remove(tmp_path / "s1.safetensors")  # e.g. lost; it must be redone

    again = _writer(tmp_path)
    assert again.has_shard("s0") and again.has_shard("s2") and not again.has_shard("s1")
    again.write("s3", random_dist(rng))
    assert ShardReader(tmp_path).shard_names == ["s0.safetensors", "s2.safetensors", "s3.safetensors"]
    got, _ = ShardReader(tmp_path).read("s2.safetensors")
    assert_dist_equal(got, dists["s2"])


@pytest.mark.parametrize("change", ["fingerprint", "k", "v", "config"])
def test_mismatched_cache_is_refused(tmp_path, rng, change):
    _writer(tmp_path).write("s0", random_dist(rng))
    kwargs = {"fp": FP, "k": 8, "v": 50, "config": CONFIG}
    other = {"fingerprint": {"fp": "0" * 64}, "k": {"k": 16}, "v": {"v": 51},
             "config": {"config": {**CONFIG, "a": 0.5}}}[change]
    kwargs.update(other)
    with pytest.raises(CacheMismatchError):
        _writer(tmp_path, **kwargs)
    reader_kwargs = {"tokenizer_fingerprint": kwargs["fp"], "k": kwargs["k"], "vocab_size": kwargs["v"],
                     "config": kwargs["config"]}
    with pytest.raises(CacheMismatchError, match=str(tmp_path)):
        ShardReader(tmp_path, **reader_kwargs)
    # The refused directory is untouched and still readable with the right expectations.
    assert ShardReader(tmp_path, tokenizer_fingerprint=FP, k=8, vocab_size=50, config=CONFIG).shard_names == \
        ["s0.safetensors"]


def test_config_mismatch_message_lists_the_differences(tmp_path, rng):
    _writer(tmp_path).write("s0", random_dist(rng))
    with pytest.raises(CacheMismatchError, match=r"another config \(a: stored .*, now 2.0\)"):
        ShardReader(tmp_path, config={**CONFIG, "a": 2.0})
    # Nested values are diffed down to the leaf that differs (e.g. one weight of a calibrated combination).
    stored = {"layers": [1, 2], "theta": {"w": [0.5, -0.3453804688011162]}, "mode": "adaptive"}
    _writer(tmp_path / "nested", config=stored).write("s0", random_dist(rng))
    with pytest.raises(CacheMismatchError,
                       match=r"\(extra: only now; layers\[1\]: stored 2, now 3; theta.w\[1\]: stored "
                             r"-0.3453804688011162, now -0.3453804688011163\)"):
        ShardReader(tmp_path / "nested", config={"layers": [1, 3], "theta": {"w": [0.5, -0.3453804688011163]},
                                                 "mode": "adaptive", "extra": 1})
    with pytest.raises(CacheMismatchError, match=r"\(layers: stored \[1, 2\], now \[1\]\)"):
        ShardReader(tmp_path / "nested", config={**stored, "layers": [1]})
    ShardReader(tmp_path / "nested", config=stored)


def test_checksum_tampering_is_detected(tmp_path, rng):
    _writer(tmp_path).write("s0", random_dist(rng))
    path = tmp_path / "s0.safetensors"
    data = bytearray(path.read_bytes())
    pos = int(rng.integers(len(data) // 2, len(data)))  # inside the tensor data
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum does not match"):
        ShardReader(tmp_path).read("s0.safetensors")
    ShardReader(tmp_path, verify=False).read("s0.safetensors")  # opting out reads the changed bytes
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="listed in the manifest but missing"):
        ShardReader(tmp_path).read("s0.safetensors")


def test_bad_manifests(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bayeskd shard directory"):
        ShardReader(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ValueError, match="manifest is not valid JSON"):
        ShardReader(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a bayeskd sparse-shard manifest"):
        ShardReader(tmp_path)
