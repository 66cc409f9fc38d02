"""The compact shard codec: about 3 bytes per top-K entry instead of 8 (int32 id + float32 log-probability).

Per row the listed entries are stored in the order the row lists them (sorted by descending probability):
- token ids bit-packed at ceil(log2 V) bits each;
- log-probabilities as the row's descending curve, coded as small unsigned steps: with x_i = lp_0 - lp_i (>= 0 and
  non-decreasing), entry i is reconstructed as x^_i = s * r_i where r_i = r_{i-1} + c_i and c_i in [0, 2^b - 1].
  The code c_i is chosen against the *reconstructed* previous value (error diffusion), so an error made on one entry
  is paid back by the next ones instead of piling up along the row. The row's step s = 2^(e/8) (e an int8) is picked
  among a few
  candidates to minimise the probability-weighted squared error, the quantity the KL to the original follows
  (docs/MATH.md: KL ~ 1/2 Var_p(error));
- the tail mass exact (float32), the number of listed entries (uint8, or int16 when K > 255): 6 bytes a row.
lp_0 itself is not stored: the decoder shifts the curve so the listed mass is exactly 1 - tail, which is what a
normalised row holds. Rows that are not normalised (|listed + tail - 1| > NORMALISED_ATOL anywhere in the shard) make
the encoder store each row's lp_0 as float32 too (`offsets`), so nothing is silently renormalised.

Precision: at the largest candidate step s_hi (the smallest 2^(e/8) >= the row's largest gap / (2^b - 2)) no code is
clipped and every entry lies within s_hi / 2 of its value, so the chosen step's p-weighted error variance is at most
s_hi^2 / 4 (unless e is clamped at 127: gaps beyond ~8e5 nats, whose entries carry no probability).

Listed entries at -inf (probability exactly 0: `SparseDist` allows them, conditioning on a revealed 0 makes them)
come last among a row's listed entries, as the descending order puts them. They keep their ids but take no code:
the curve covers the finite entries only, and the per-row number of finite entries is stored (`finite`, the
counts' dtype) when some row has a -inf entry; the decoder gives those entries -inf exactly. Such shards are codec
version 2 (a version-1 reader refuses them rather than misreading them); shards without -inf entries are written
exactly as before, as version 1.

Encoding and decoding are compiled (numba), one pass over the entries; `id_bits` + `default_logprob_bits` say what
an entry costs.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

CODEC = "compact"
CODEC_VERSION = 2  # 2: may hold `compact.finite` (rows with -inf entries); written as 1 when it does not
LOGPROB_BITS_RANGE = (2, 16)  # 1 bit (codes 0..1) cannot cover any gap without clipping: no step to pick
NORMALISED_ATOL = 1e-4
_STEP_CANDIDATES = 8  # steps tried per row: the no-clipping one and 7 smaller ones, each 2^(-1/2) of the last


def id_bits(vocab_size: int) -> int:
    """Bits per token id: ceil(log2 V)."""
    return max(1, int(vocab_size - 1).bit_length())


def default_logprob_bits(vocab_size: int) -> int:
    """Bits per log-probability code: what keeps id + code within 23 bits (3 bytes an entry with the per-row
    fields at K = 64), between 4 and 8."""
    return int(min(8, max(4, 23 - id_bits(vocab_size))))


@nb.njit(cache=True, nogil=True)
def _put(buf, bitpos, value, nbits):
    """Write `nbits` low bits of `value` at bit `bitpos` (little-endian bit order)."""
    for _ in range(nbits):
        if value & 1:
            buf[bitpos >> 3] |= np.uint8(1 << (bitpos & 7))
        value >>= 1
        bitpos += 1
    return bitpos


@nb.njit(cache=True, nogil=True)
def _get(buf, bitpos, nbits):
    """Read `nbits` (<= 25) bits at bit `bitpos`: one 4-byte window, or byte by byte at the end of the buffer."""
    at = bitpos >> 3
    if at + 4 <= len(buf):
        word = (np.int64(buf[at]) | (np.int64(buf[at + 1]) << 8) | (np.int64(buf[at + 2]) << 16)
                | (np.int64(buf[at + 3]) << 24))
        return (word >> (bitpos & 7)) & ((1 << nbits) - 1)
    value = 0
    got = 0
    while got < nbits:
        byte = np.int64(buf[bitpos >> 3]) >> (bitpos & 7)
        take = min(8 - (bitpos & 7), nbits - got)
        value |= (byte & ((1 << take) - 1)) << got
        got += take
        bitpos += take
    return value


@nb.njit(cache=True, nogil=True)
def _code_row(x, p, n, step, max_code, codes):
    """Error-diffused codes of one row's curve x[0:n] at `step`; returns the p-weighted error variance."""
    r = 0
    sw = 0.0
    se = 0.0
    se2 = 0.0
    for i in range(n):
        want = int(math.floor(x[i] / step + 0.5)) - r
        c = min(max(want, 0), max_code)
        r += c
        codes[i] = c
        e = r * step - x[i]
        sw += p[i]
        se += p[i] * e
        se2 += p[i] * e * e
    if sw <= 0.0:
        return 0.0
    return se2 / sw - (se / sw) ** 2


@nb.njit(cache=True, nogil=True)
def _encode(indices, logprobs, counts, finite, id_nbits, lp_nbits, steps, id_buf, lp_buf):
    n_rows, k = indices.shape
    max_code = (1 << lp_nbits) - 1
    x = np.empty(k, np.float64)
    p = np.empty(k, np.float64)
    codes = np.empty(k, np.int64)
    best = np.empty(k, np.int64)
    id_pos = 0
    lp_pos = 0
    for row in range(n_rows):
        n = counts[row]
        nf = finite[row]  # entries nf..n-1 are -inf: ids only, no code
        for i in range(n):
            id_pos = _put(id_buf, id_pos, np.int64(indices[row, i]), id_nbits)
        if nf == 0:
            steps[row] = 0
            continue
        top = logprobs[row, 0]
        max_delta = 0.0
        for i in range(nf):
            x[i] = top - logprobs[row, i]
            p[i] = math.exp(logprobs[row, i])
            if i > 0:
                max_delta = max(max_delta, x[i] - x[i - 1])
        # the smallest step 2^(e/8) at which no delta is clipped, then smaller ones (clipping paid back later)
        e_hi = min(127, max(-128, int(math.ceil(8.0 * math.log2(max(max_delta / (max_code - 1), 1e-30))))))
        best_err = np.inf
        best_e = e_hi
        for j in range(_STEP_CANDIDATES):
            e = max(-128, e_hi - 4 * j)
            err = _code_row(x, p, nf, 2.0 ** (e / 8.0), max_code, codes)
            if err < best_err:
                best_err = err
                best_e = e
                best[:nf] = codes[:nf]
        steps[row] = best_e
        for i in range(nf):
            lp_pos = _put(lp_buf, lp_pos, best[i], lp_nbits)


@nb.njit(cache=True, nogil=True)
def _decode(counts, finite, steps, tail, offsets, use_offsets, id_nbits, lp_nbits, id_buf, lp_buf, out_idx,
            out_lp):
    n_rows, k = out_idx.shape
    id_pos = 0
    lp_pos = 0
    for row in range(n_rows):
        n = counts[row]
        nf = finite[row]
        r = 0
        mass = 0.0
        step = 2.0 ** (steps[row] / 8.0)
        for i in range(n):
            out_idx[row, i] = _get(id_buf, id_pos, id_nbits)
            id_pos += id_nbits
            if i >= nf:  # written as -inf: no code
                out_lp[row, i] = -np.inf
                continue
            r += _get(lp_buf, lp_pos, lp_nbits)
            lp_pos += lp_nbits
            v = -r * step
            out_lp[row, i] = v
            mass += math.exp(v)
        if nf > 0:
            shift = offsets[row] if use_offsets else math.log(max(1.0 - np.float64(tail[row]), 1e-45)) - math.log(mass)
            for i in range(nf):
                out_lp[row, i] += shift
        for i in range(n, k):
            out_idx[row, i] = -1
            out_lp[row, i] = -np.inf


def encode(indices: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int,
           logprob_bits: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A top-K block ([N, K] ids with -1 padding at the end, log-probs sorted descending, listed ones finite or
    -inf, [N] tail) as compact tensors and the codec parameters the manifest keeps. `logprob_bits`: 2..16, None
    for `default_logprob_bits`."""
    idx = indices.cpu().numpy().astype(np.int64)
    lp = logprobs.float().cpu().numpy().astype(np.float64)
    tl = tail.float().cpu().numpy().astype(np.float32)
    n_rows, k = idx.shape
    listed = idx >= 0
    counts = listed.sum(axis=1)
    if (listed[:, 1:] & ~listed[:, :-1]).any():
        raise ValueError("compact codec: padding (index -1) must come after every listed entry of a row")
    with np.errstate(invalid="ignore"):  # -inf - -inf between padding slots
        rising = k > 1 and (np.where(listed[:, 1:], lp[:, 1:] - lp[:, :-1], 0.0) > 1e-6).any()
    if rising:
        raise ValueError("compact codec: listed log-probabilities must be sorted in descending order")
    bad = listed & (np.isnan(lp) | (lp == np.inf))
    if bad.any():
        raise ValueError(f"compact codec: row {int(bad.any(axis=1).argmax())} lists a NaN or +inf log-probability")
    finite = listed & np.isfinite(lp)  # sorted, so a row's finite entries come first and its -inf ones after
    n_finite = finite.sum(axis=1)
    lp_nbits = default_logprob_bits(vocab_size) if logprob_bits is None else int(logprob_bits)
    id_nbits = id_bits(vocab_size)
    if id_nbits > 25:  # the decoder reads each field from one 4-byte window
        raise ValueError(f"compact codec: V={vocab_size} needs {id_nbits}-bit ids; at most 2^25 tokens")
    if not LOGPROB_BITS_RANGE[0] <= lp_nbits <= LOGPROB_BITS_RANGE[1]:
        raise ValueError(f"compact codec: logprob_bits must be in {LOGPROB_BITS_RANGE[0]}..{LOGPROB_BITS_RANGE[1]}, "
                         f"got {lp_nbits}")
    id_buf = np.zeros((int(counts.sum()) * id_nbits + 7) // 8, np.uint8)
    lp_buf = np.zeros((int(n_finite.sum()) * lp_nbits + 7) // 8, np.uint8)
    steps = np.zeros(n_rows, np.int8)
    _encode(idx, lp, counts.astype(np.int64), n_finite.astype(np.int64), id_nbits, lp_nbits, steps, id_buf, lp_buf)
    listed_mass = np.where(finite, np.exp(lp), 0.0).sum(axis=1)
    use_offsets = bool(n_rows and (np.abs(listed_mass + tl - 1.0)[n_finite > 0] > NORMALISED_ATOL).any())
    count_dtype = np.uint8 if k <= 255 else np.int16
    tensors = {
        "compact.ids": torch.from_numpy(id_buf), "compact.codes": torch.from_numpy(lp_buf),
        "compact.steps": torch.from_numpy(steps),
        "compact.counts": torch.from_numpy(counts.astype(count_dtype)),
        "tail": torch.from_numpy(tl),
    }
    if use_offsets:
        tensors["compact.offsets"] = torch.from_numpy(np.where(n_finite > 0, lp[:, 0], 0.0).astype(np.float32))
    has_neg_inf = bool((n_finite < counts).any())
    if has_neg_inf:
        tensors["compact.finite"] = torch.from_numpy(n_finite.astype(count_dtype))
    params = {"codec": CODEC, "codec_version": CODEC_VERSION if has_neg_inf else 1, "id_bits": id_nbits,
              "logprob_bits": lp_nbits, "k": k, "rows": n_rows}
    return tensors, params


def decode(tensors: dict[str, torch.Tensor], params: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices int32 [N, K], logprobs float32 [N, K], tail float32 [N]) from `encode`'s tensors and parameters."""
    if params.get("codec") != CODEC or params.get("codec_version") not in range(1, CODEC_VERSION + 1):
        raise ValueError(f"unknown shard codec {params.get('codec')!r} version {params.get('codec_version')!r}")
    counts = tensors["compact.counts"].numpy().astype(np.int64)
    n_rows, k = int(params["rows"]), int(params["k"])
    if counts.shape != (n_rows,) or (counts > k).any() or (counts < 0).any():
        raise ValueError(f"compact shard: {counts.shape[0]} row counts for {n_rows} rows of K={k}")
    if "compact.finite" in tensors:  # version 2 with -inf entries; otherwise every listed entry is finite
        finite = tensors["compact.finite"].numpy().astype(np.int64)
        if finite.shape != (n_rows,) or (finite > counts).any() or (finite < 0).any():
            raise ValueError(f"compact shard: finite counts {tuple(finite.shape)} do not fit the {n_rows} row counts")
    else:
        finite = counts
    id_nbits, lp_nbits = int(params["id_bits"]), int(params["logprob_bits"])
    id_buf, lp_buf = tensors["compact.ids"].numpy(), tensors["compact.codes"].numpy()
    total = int(counts.sum())
    if len(id_buf) < (total * id_nbits + 7) // 8 or len(lp_buf) < (int(finite.sum()) * lp_nbits + 7) // 8:
        raise ValueError(f"compact shard: packed streams shorter than {total} entries need")
    tail = tensors["tail"].float()
    offsets = tensors.get("compact.offsets")
    out_idx = np.empty((n_rows, k), np.int32)
    out_lp = np.empty((n_rows, k), np.float32)
    _decode(counts, finite, tensors["compact.steps"].numpy().astype(np.int64), tail.numpy(),
            offsets.numpy() if offsets is not None else np.zeros(n_rows, np.float32), offsets is not None,
            id_nbits, lp_nbits, id_buf, lp_buf, out_idx, out_lp)
    return torch.from_numpy(out_idx), torch.from_numpy(out_lp), tail
