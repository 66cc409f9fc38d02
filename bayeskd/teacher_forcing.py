"""Teacher forcing: a model's rows at the response positions of prompt + response sequences.

Every stage that runs a model over teacher text (the posterior's proxy, the trainer's student, proxy and
white-box teacher, Proxy-KD, GAD, evaluation, the lab's white-box teacher) goes through this file, so they agree
on two rules:

- Row order. The logits at position t-1 predict the token at position t. A padded batch's rows are
  `logits[:, :-1][response_mask[:, 1:]]`: batch row by batch row, positions left to right (`select_rows`).
  Over tokenized records (`record_batches`), rows are in target-row order: record by record in the order asked
  for, one row per response token, which is how target shards store them.
- Position 0. A response token at position 0 (an empty prompt and no BOS) has no context: the model gives it no
  row (`pad_batch` clears position 0 of the response mask). In target-row order its row exists, is the uniform
  distribution and is marked invalid; `TeacherTargetsDataset` drops it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch


def pad_batch(seqs: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
              response_masks: Sequence[Sequence[bool] | np.ndarray | torch.Tensor],
              pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token sequences: input_ids [B, L] (long), attention_mask [B, L] (long) and response_mask [B, L]
    (bool, False at position 0 and at padding)."""
    b, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((b, L), pad_token_id, dtype=torch.long)
    attention = torch.zeros((b, L), dtype=torch.long)
    rmask = torch.zeros((b, L), dtype=torch.bool)
    for j, (s, m) in enumerate(zip(seqs, response_masks)):
        n = len(s)
        input_ids[j, :n] = torch.as_tensor(np.asarray(s, dtype=np.int64) if not torch.is_tensor(s) else s)
        attention[j, :n] = 1
        rmask[j, :n] = torch.as_tensor(np.asarray(m, dtype=bool) if not torch.is_tensor(m) else m)
    rmask[:, 0] = False  # position 0 has no context
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": rmask}


def pad_prompt_response(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                        pad_token_id: int) -> dict[str, torch.Tensor]:
    """`pad_batch` of prompt + response token lists, the response positions marked."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    masks = [np.arange(len(s)) >= len(p) for s, p in zip(seqs, prompts)]
    return pad_batch(seqs, masks, pad_token_id)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the attended tokens (right padding: 0..n-1, padding repeats the last)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 keep_from: int = 0, explicit_positions: bool = False) -> torch.Tensor:
    """The model's logits [B, L - keep_from, W]. `keep_from` > 0 runs the output embedding from that position on
    only (`logits_to_keep`, for models that take it); `explicit_positions` passes `position_ids` from the mask."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if explicit_positions:
        kwargs["position_ids"] = position_ids(attention_mask)
    if keep_from > 0:
        kwargs["logits_to_keep"] = int(input_ids.shape[1] - keep_from)
    return model(**kwargs).logits


def select_rows(grid: torch.Tensor, response_mask: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """The rows of a per-position grid [B, L, ...] (logits: position t-1 predicts token t) that predict response
    tokens, in row order. `shifted`: the grid is already aligned with the predicted tokens, [B, L-1, ...]
    (e.g. input_ids[:, 1:], or `token_logprobs`)."""
    sel = response_mask[:, 1:].to(grid.device)
    return (grid if shifted else grid[:, :-1])[sel]


def response_rows(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits rows [M, W], the tokens they predict [M]) of a `pad_batch` batch, in row order."""
    logits = model_logits(model, batch["input_ids"], batch["attention_mask"])
    rmask = batch["response_mask"]
    return select_rows(logits, rmask), select_rows(batch["input_ids"][:, 1:], rmask, shifted=True)


def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                   explicit_positions: bool = False) -> torch.Tensor:
    """log p(token t | tokens < t) at `temperature` for every t >= 1, [B, L-1] (`select_rows` picks the
    response ones)."""
    ids = batch["input_ids"]
    logits = model_logits(model, ids, batch["attention_mask"], explicit_positions=explicit_positions)
    logits = logits[:, :-1].float() / temperature
    return logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


# ---------------------------------------------------------------------------------------------------- records

@dataclass
class RecordBatch:
    """A padded batch of tokenized records and where its model rows go in target-row order."""
    records: np.ndarray  # positions (into the `indices` asked for) of this batch's records (or their windows)
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    batch_index: torch.Tensor  # [M]: the logits at (batch_index, position) predict the token at position + 1
    position: torch.Tensor  # [M]
    target_row: torch.Tensor  # [M]: the row in target-row order
    keep_from: int  # the first position any row needs (the shortest prompt, minus one; in its window)

    def tokens(self) -> torch.Tensor:
        """The response tokens the rows predict [M]."""
        return self.input_ids[self.batch_index, self.position + 1]


def target_row_layout(tokenized, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence lengths, prompt lengths, row offsets [len(indices) + 1]) of the records `indices`: record q's
    target rows are offsets[q] .. offsets[q + 1]."""
    indices = np.asarray([int(i) for i in indices], dtype=np.int64)
    lens = np.array([len(tokenized.input_ids[i]) for i in indices], dtype=np.int64)
    plens = np.asarray(tokenized.prompt_lengths, dtype=np.int64)[indices] if len(indices) else np.zeros(0, np.int64)
    return lens, plens, np.concatenate([[0], np.cumsum(lens - plens)]).astype(np.int64)


def record_batches(tokenized, indices: Sequence[int], batch_size: int,
                   max_length: int | None = None) -> Iterator[RecordBatch]:
    """Batches of the records `indices`, longest first (stable), right-padded; batches without a row are
    skipped. Rows: every response token with a context (position >= 1).

    `max_length` (a model's context): a longer record is read in windows of `max_length` tokens, each starting
    half a window after the last (the final one ends with the record), and each row comes from the window that
    gives it the most context: at least half a window, where a truncated record would have none."""
    indices = np.asarray([int(i) for i in indices], dtype=np.int64)
    lens_all, plens_all, offsets = target_row_layout(tokenized, indices)
    # segments (record q, window start s, window end e, first token predicted a): rows for tokens a..e-1
    segs = [(q, 0, int(lens_all[q]), max(int(plens_all[q]), 1)) for q in range(len(indices))]
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        segs = [w for seg in segs for w in _windows(*seg, max_length)]
    seg_len = np.array([e - s for _, s, e, _ in segs], dtype=np.int64)
    order = np.argsort(-seg_len, kind="stable")  # similar lengths together: little padding
    for b in range(0, len(order), batch_size):
        batch = [segs[j] for j in order[b:b + batch_size]]
        q, s, e, a = (np.array(x, dtype=np.int64) for x in zip(*batch))
        n = np.maximum(e - a, 0)
        if n.sum() == 0:
            continue
        starts = np.cumsum(n) - n
        ramp = np.arange(int(n.sum())) - np.repeat(starts, n)
        L = int((e - s).max())
        ids = torch.zeros((len(batch), L), dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for j in range(len(batch)):
            ids[j, :e[j] - s[j]] = torch.from_numpy(tokenized.input_ids[indices[q[j]]][s[j]:e[j]].astype(np.int64))
            mask[j, :e[j] - s[j]] = 1
        yield RecordBatch(
            records=q, input_ids=ids, attention_mask=mask,
            batch_index=torch.from_numpy(np.repeat(np.arange(len(batch)), n)),
            position=torch.from_numpy(np.repeat(a - 1 - s, n) + ramp),
            target_row=torch.from_numpy(np.repeat(offsets[q] + a - plens_all[q], n) + ramp),
            keep_from=max(int((a - 1 - s).min()), 0))


def _windows(q: int, s: int, e: int, a: int, size: int) -> list[tuple[int, int, int, int]]:
    """A record's segment cut into windows of `size` tokens, half a window apart (the last one ending with the
    record); each token a..e-1 is predicted in exactly one window, with at least size - size // 2 - 1 tokens
    before it there."""
    if e - s <= size:
        return [(q, s, e, a)]
    stride, out, done = max(size // 2, 1), [], s  # `done`: tokens before it are predicted by earlier windows
    start = s
    while done < e:
        start = min(start, e - size)
        if max(a, done) < start + size:  # (a window inside a long prompt predicts nothing)
            out.append((q, start, start + size, max(a, done)))
        done, start = start + size, start + stride
    return out


def contextless_rows(tokenized, indices: Sequence[int]) -> torch.Tensor:
    """bool [N] in target-row order: True at the rows of response tokens at position 0 (no context)."""
    lens, plens, offsets = target_row_layout(tokenized, indices)
    out = torch.zeros(int(offsets[-1]), dtype=torch.bool)
    at0 = np.nonzero((plens == 0) & (lens > 0))[0]
    out[torch.from_numpy(offsets[at0])] = True
    return out


@torch.no_grad()
def target_logprobs(model, tokenized, indices: Sequence[int] | None = None, *, vocab_size: int | None = None,
                    batch_size: int = 16, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [N, V] float32, valid [N] bool) of `model` at every response position of the records
    `indices` (all by default), in target-row order. A row without context is uniform and invalid. Only the
    first `vocab_size` logits are used (padded vocabularies)."""
    V = int(vocab_size if vocab_size is not None else tokenized.vocab_size)
    indices = list(range(len(tokenized))) if indices is None else [int(i) for i in indices]
    _, _, offsets = target_row_layout(tokenized, indices)
    out = torch.full((int(offsets[-1]), V), -math.log(V))
    model = model.to(device).eval()
    for rb in record_batches(tokenized, indices, batch_size):
        logits = model_logits(model, rb.input_ids.to(device), rb.attention_mask.to(device))
        if logits.shape[-1] < V:
            raise ValueError(f"model logits have {logits.shape[-1]} entries, fewer than the vocabulary size {V}")
        rows = logits[rb.batch_index.to(device), rb.position.to(device), :V].float()
        out[rb.target_row] = torch.log_softmax(rows, dim=-1).cpu()
    return out, ~contextless_rows(tokenized, indices)
