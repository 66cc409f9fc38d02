"""What a distillation step reads: teacher records paired with the rows of their sparse targets.

- `TeacherTargetsDataset` pairs each tokenized record with the rows of its sparse targets (one row per response
  token, read from a shard directory whose shards hold whole records: extras `record_index` [R] and `lengths` [R]).
- `BayesKDCollator` right-pads a batch (`bayeskd.teacher_forcing.pad_batch`) and concatenates the targets of
  every response token in the batch in the order of `response_mask[:, 1:]` flattened row-major (batch row by
  batch row, left to right): exactly the order of `bayeskd.teacher_forcing.response_rows`, in which
  `BayesKDTrainer.compute_loss` selects the student rows.
- `proxy_kd_weights`: Proxy-KD's per-record weights from the proxy's likelihood of the teacher response.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bayeskd.data import TokenizedData, truncation_window
from bayeskd.core.sparse import CacheMismatchError, ShardReader, SparseDist
from bayeskd.core.names import CONTEXT_COUNT, LENGTHS, RECORD_INDEX, TEACHER_LOGPROB
from bayeskd.teacher_forcing import pad_batch

TARGET_KEYS = ("target_indices", "target_logprobs", "target_tail")
CONTEXT_COUNT_KEY = "target_context_count"  # the prior's per-row context counts (Dirichlet mode), when stored
WEIGHT_KEY = "target_weight"  # per-row KD weights [M] (Proxy-KD: the record's weight on each of its rows)
WEIGHT_NORMALIZATIONS = ("sequence", "token")


def proxy_kd_weights(seq_logprob: Sequence[float] | np.ndarray | torch.Tensor,
                     n_tokens: Sequence[int] | np.ndarray | torch.Tensor,
                     normalization: str = "sequence") -> np.ndarray:
    """Per-record Proxy-KD weights w = σ((s - μ)/γ), float64 [N] in (0, 1).

    s is the proxy's log p(y_T|x): `seq_logprob` (sum over response tokens) with normalization="sequence", or
    `seq_logprob / n_tokens` with "token"; μ and γ are the mean and (population) std of s over the records. When
    γ = 0 (one record, or all equal) every weight is 0.5. Monotone increasing in s.
    """
    if normalization not in WEIGHT_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {WEIGHT_NORMALIZATIONS}, got {normalization!r}")
    s = np.asarray(torch.as_tensor(seq_logprob).double().numpy() if torch.is_tensor(seq_logprob) else seq_logprob,
                   dtype=np.float64)
    n = np.asarray(torch.as_tensor(n_tokens).numpy() if torch.is_tensor(n_tokens) else n_tokens, dtype=np.float64)
    if s.ndim != 1 or n.shape != s.shape or len(s) == 0:
        raise ValueError(f"seq_logprob and n_tokens must be non-empty 1-D arrays of one length, got shapes "
                         f"{s.shape} and {n.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"seq_logprob has non-finite values (first at record {int(np.argmin(np.isfinite(s)))})")
    if normalization == "token":
        if (n <= 0).any():
            raise ValueError(f"n_tokens must be > 0 for normalization='token' (record {int(np.argmin(n > 0))})")
        s = s / n
    gamma = s.std()
    if not gamma > 0:
        return np.full(len(s), 0.5)
    z = (s - s.mean()) / gamma
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------------------------------- dataset

class TeacherTargetsDataset(torch.utils.data.Dataset):
    """Item i: {"input_ids" [L], "response_mask" [L], and with targets "target_indices" [n_i, K],
    "target_logprobs" [n_i, K], "target_tail" [n_i]}, where n_i = response_mask[1:].sum(): one target row per
    response token that has a context (a response token at position 0 has none; its row is dropped).

    The targets directory must hold, for every record, exactly as many rows as the record has response tokens
    (before any `max_length` truncation), made with the same tokenizer (fingerprint in the manifest).
    `max_length` truncates like `tokenize_records`: the prompt from the left, a response that does not fit alone
    from the right (its target rows with it), keeping one prompt token as context.

    Shards with the per-row extras `proxy_teacher_logprob` give `proxy_seq_logprob` [N] (its sum over each record's
    rows, all of them, before truncation) and `proxy_n_tokens` [N]. With `weight_normalization` ("sequence" or
    "token") the dataset computes the Proxy-KD weights over all its records (`proxy_kd_weights`), and item i also
    holds "proxy_kd_weight" (a scalar).
    """

    def __init__(self, tokenized: TokenizedData, targets_dir: str | None = None, max_length: int | None = None,
                 weight_normalization: str | None = None):
        self.tokenized = tokenized
        self.max_length = max_length
        self.targets_dir = targets_dir
        self.vocab_size: int | None = None
        self.k: int | None = None
        self._dists: list[SparseDist] = []
        self._where: np.ndarray | None = None  # [N, 2] (shard number, first row) per record
        self.proxy_seq_logprob: np.ndarray | None = None
        self.proxy_n_tokens: np.ndarray | None = None
        self.proxy_kd_weights: np.ndarray | None = None
        if targets_dir is not None:
            self._index_targets(Path(targets_dir))
        if weight_normalization is not None:
            if self.proxy_seq_logprob is None:
                raise ValueError(f"{targets_dir}: Proxy-KD weights need target shards with the per-row extras "
                                 f"'{TEACHER_LOGPROB}' (the proxy's log-probability of the teacher token, written "
                                 "by `bayeskd estimate-posterior --proxy P` without --prior)")
            self.proxy_kd_weights = proxy_kd_weights(self.proxy_seq_logprob, self.proxy_n_tokens,
                                                     weight_normalization)

    def _index_targets(self, d: Path) -> None:
        tok = self.tokenized
        reader = ShardReader(d, tokenizer_fingerprint=tok.fingerprint)  # raises CacheMismatchError on mismatch
        self.vocab_size, self.k = int(reader.manifest["vocab_size"]), int(reader.manifest["k"])
        if self.vocab_size < tok.vocab_size:
            raise CacheMismatchError(f"{d}: targets have vocabulary size {self.vocab_size}, smaller than the "
                                     f"tokenizer's {tok.vocab_size}")
        n = len(tok)
        where = np.full((n, 2), -1, dtype=np.int64)
        want = tok.lengths - tok.prompt_lengths.astype(np.int64)  # response tokens per record
        seq_lp = np.zeros(n)
        with_lp = 0  # shards that carry the proxy's teacher-token log-probabilities
        for s, name in enumerate(reader.shard_names):
            dist, extra = reader.read(name)
            # per-row extras (SparseDist.extras); accepted among the shard's other tensors too
            row_lp = dist.extras.get(TEACHER_LOGPROB, extra.get(TEACHER_LOGPROB))
            if row_lp is not None:
                with_lp += 1
                row_lp = row_lp.double().reshape(-1).numpy()
                if row_lp.shape[0] != dist.num_rows or not np.isfinite(row_lp).all():
                    raise ValueError(f"{d / name}: extras '{TEACHER_LOGPROB}' must be finite with one value per "
                                     f"row ({dist.num_rows}), got {row_lp.shape[0]} values")
                cum = np.concatenate([[0.0], np.cumsum(row_lp)])
            if RECORD_INDEX not in extra or LENGTHS not in extra:
                raise ValueError(f"{d / name}: shard lacks the 'record_index'/'lengths' extras that map its rows "
                                 "to records")
            rec = extra[RECORD_INDEX].long().numpy()
            lens = extra[LENGTHS].long().numpy()
            if rec.shape != lens.shape or int(lens.sum()) != dist.num_rows:
                raise ValueError(f"{d / name}: 'lengths' sum to {int(lens.sum())} rows but the shard holds "
                                 f"{dist.num_rows}")
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            for r, ln, st in zip(rec, lens, starts):
                if not 0 <= r < n:
                    raise ValueError(f"{d / name}: record_index {r} outside the {n} records of the data "
                                     "(targets made for other data?)")
                if where[r, 0] >= 0:
                    raise ValueError(f"{d / name}: record {r} appears in two shards")
                if ln != want[r]:
                    raise ValueError(f"{d / name}: record {r} has {ln} target rows but {want[r]} response tokens "
                                     "(targets made for other data, another tokenizer or another max_length?)")
                where[r] = (s, st)
                if row_lp is not None:
                    seq_lp[r] = cum[st + ln] - cum[st]
            self._dists.append(dist)
        missing = np.nonzero(where[:, 0] < 0)[0]
        if len(missing):
            raise ValueError(f"{d}: no target rows for {len(missing)} of {n} records (first: record "
                             f"{int(missing[0])}); targets made for other data?")
        self._where = where
        if with_lp and with_lp != len(reader.shard_names):
            raise ValueError(f"{d}: only {with_lp} of {len(reader.shard_names)} shards carry the extras "
                             f"'{TEACHER_LOGPROB}'")
        if with_lp:
            self.proxy_seq_logprob, self.proxy_n_tokens = seq_lp, want

    @property
    def has_targets(self) -> bool:
        return self._where is not None

    def __len__(self) -> int:
        return len(self.tokenized)

    def record_rows(self, i: int) -> SparseDist:
        """Every target row of record `i`: one per response token, before any `max_length` truncation."""
        if self._where is None:
            raise ValueError("this dataset was made without a targets directory")
        s, st = (int(x) for x in self._where[i])
        n = len(self.tokenized.input_ids[i]) - int(self.tokenized.prompt_lengths[i])
        return self._dists[s][st:st + n]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tok = self.tokenized
        ids = np.asarray(tok.input_ids[i], dtype=np.int64)
        p = int(tok.prompt_lengths[i])
        r_lo, r_hi = 0, len(ids) - p  # target rows kept [r_lo, r_hi) of this record's response
        keep_p, r_hi = truncation_window(p, r_hi, self.max_length)  # the one policy, as tokenize_records
        if keep_p < p or r_hi < len(ids) - p:
            ids = np.concatenate([ids[p - keep_p:p], ids[p:p + r_hi]])
            p = keep_p
        mask = np.arange(len(ids)) >= p
        if p == 0:
            r_lo = 1  # a response token at position 0 is predicted from nothing: no row for it
        item = {"input_ids": torch.from_numpy(ids), "response_mask": torch.from_numpy(mask)}
        if self._where is not None:
            rows = self.record_rows(i)[r_lo:r_hi]
            item.update(target_indices=rows.indices, target_logprobs=rows.logprobs, target_tail=rows.tail)
            if CONTEXT_COUNT in rows.extras:
                item[CONTEXT_COUNT_KEY] = rows.extras[CONTEXT_COUNT].reshape(-1)
            if self.proxy_kd_weights is not None:
                item["proxy_kd_weight"] = torch.tensor(self.proxy_kd_weights[i], dtype=torch.float32)
        return item


# ---------------------------------------------------------------------------------------------------- collator

@dataclass
class BayesKDCollator:
    """Right-pads `input_ids` with `pad_token_id`, builds `attention_mask`, `labels` (the token ids at response
    positions, -100 elsewhere) and, when the items have targets, concatenates them.

    Target order: the rows of item 0, then item 1, ...; within an item, response positions left to right. This is
    the order of `response_mask[:, 1:]` flattened row-major, i.e. the order of
    `logits[:, :-1][response_mask[:, 1:]]` (the logits at position t-1 predict the token at position t).
    Items with a "proxy_kd_weight" give "target_weight" [M], each item's weight repeated over its rows.
    """
    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # position 0 has no context (its target row, if any, was dropped by the dataset)
        out = pad_batch([it["input_ids"] for it in items], [it["response_mask"] for it in items], self.pad_token_id)
        input_ids, rmask = out["input_ids"], out["response_mask"]
        out["labels"] = torch.where(rmask, input_ids, torch.full_like(input_ids, -100))
        if all(k in items[0] for k in TARGET_KEYS):
            for k in TARGET_KEYS:
                out[k] = torch.cat([it[k] for it in items])
            if all(CONTEXT_COUNT_KEY in it for it in items):
                out[CONTEXT_COUNT_KEY] = torch.cat([it[CONTEXT_COUNT_KEY] for it in items])
            if all("proxy_kd_weight" in it for it in items):  # the record's weight on each of its rows
                out[WEIGHT_KEY] = torch.cat([it["proxy_kd_weight"].float().expand(it["target_tail"].shape[0])
                                             for it in items])
            if out["target_tail"].shape[0] != int(rmask[:, 1:].sum()):
                raise ValueError(f"batch has {int(rmask[:, 1:].sum())} response tokens but "
                                 f"{out['target_tail'].shape[0]} target rows")
        return out
