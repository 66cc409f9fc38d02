"""On-policy batches: a share of a collated batch's sequences replaced by the student's own samples (GKD's mix).

`BayesKDTrainer` (with `BayesKDConfig.onpolicy_fraction` > 0) calls `mix_onpolicy` on every micro-batch of a step
before the step's response tokens are counted, so the loss stays the mean over the step's response tokens (the
student's sampled tokens included):

- `choose_rows`: which sequences are replaced, floor(λB) of them plus one more with probability frac(λB), drawn
  from a generator seeded by `step_seed(seed, global step, micro-batch, rank)` (a resumed run draws the same).
- `sample_responses`: the student's samples for those prompts, batched (left-padded) `model.generate` without
  gradient, temperature-only sampling (no top-k / top-p), under that seed in a forked RNG (the Trainer's RNG
  streams are left as they were). A response ends after its first EOS (kept: the student chose it).
- `build_batch`: the batch again, right-padded as `BayesKDCollator` pads it, the replaced rows holding prompt +
  sample; `onpolicy_mask` [B] marks them. The teacher rows keep their target rows; the student rows get the
  prior's top-K rows at their contexts (`prior_rows`, for the online posterior) or none (white-box: the teacher
  runs on the batch in the loss).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from bayeskd.distillation.targets import CONTEXT_COUNT_KEY, TARGET_KEYS, WEIGHT_KEY
from bayeskd.core.names import CONTEXT_COUNT
from bayeskd.teacher_forcing import pad_batch

ONPOLICY_KEY = "onpolicy_mask"  # [B] bool: the rows that hold the student's samples


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    """The sampling seed of one micro-batch: a function of (run seed, global step, micro-batch, rank) only."""
    return int(np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)]).generate_state(1, np.uint64)[0]
               & ((1 << 63) - 1))


def choose_rows(batch_size: int, fraction: float, seed: int) -> torch.Tensor:
    """The sorted indices of the rows to replace: floor(fraction * B), plus one with probability the remainder."""
    g = torch.Generator().manual_seed(seed)
    want = fraction * batch_size
    n = int(want)
    if torch.rand((), generator=g).item() < want - n:
        n += 1
    return torch.randperm(batch_size, generator=g)[:min(n, batch_size)].sort().values


def prompt_lengths(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the tokens before the first response position (the whole sequence when it has none) [B]."""
    rmask, lengths = inputs["response_mask"], inputs["attention_mask"].sum(1)
    has = rmask.any(1)
    first = rmask.long().argmax(1)
    return torch.where(has, first, lengths)


@torch.no_grad()
def sample_responses(model, prompts: Sequence[torch.Tensor], *, temperature: float, max_new_tokens: Sequence[int],
                     pad_token_id: int, eos_token_id: int | None, seed: int) -> list[torch.Tensor]:
    """The student's sampled response to each prompt (1-D long tensors on the prompts' device), each at most
    `max_new_tokens[i]` long and cut after its first EOS."""
    if not prompts:
        return []
    device = prompts[0].device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: generation continues every row at its end
        ids[i, width - len(p):] = p
        attention[i, width - len(p):] = 1
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=int(max(max_new_tokens)),
                                 pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    finally:
        model.train(was_training)
    responses = []
    for i, gen in enumerate(out[:, width:]):
        gen = gen[:int(max_new_tokens[i])]
        if eos_token_id is not None:
            ends = (gen == eos_token_id).nonzero()
            if len(ends):
                gen = gen[:int(ends[0]) + 1]
        responses.append(gen.clone())
    return responses


def prior_rows(prior: Any, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], k: int):
    """The prior's top-`k` rows at every sampled token (token t of a response given the prompt and tokens < t),
    rows concatenated response by response: a `SparseDist` on the CPU."""
    seqs = [r.cpu().numpy().astype(np.int64) for r in responses]
    ctxs = [p.cpu().numpy().astype(np.int64) for p in prompts]
    return prior.topk(seqs, k, contexts=ctxs)


def build_batch(inputs: dict[str, torch.Tensor], rows: torch.Tensor, prompts: Sequence[torch.Tensor],
                responses: Sequence[torch.Tensor], pad_token_id: int, student_targets=None) -> dict[str, torch.Tensor]:
    """`inputs` with the sequences of `rows` replaced by prompt + response (their rows of targets by
    `student_targets`, a SparseDist with one row per sampled token, when the batch has targets)."""
    ids, attention, rmask = inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"]
    device = ids.device
    replaced = {int(r): i for i, r in enumerate(rows)}
    seqs, masks = [], []
    for j in range(ids.shape[0]):
        if j in replaced:
            i = replaced[j]
            seqs.append(torch.cat([prompts[i], responses[i]]).cpu())
            masks.append(torch.arange(len(seqs[-1])) >= len(prompts[i]))
        else:
            n = int(attention[j].sum())
            seqs.append(ids[j, :n].cpu())
            masks.append(rmask[j, :n].cpu())
    out = pad_batch(seqs, masks, pad_token_id)
    out = {k: v.to(device) for k, v in out.items()}
    out["labels"] = torch.where(out["response_mask"], out["input_ids"], torch.full_like(out["input_ids"], -100))
    mask = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    mask[rows.to(device)] = True
    out[ONPOLICY_KEY] = mask
    if WEIGHT_KEY in inputs:
        raise ValueError("on-policy samples have no Proxy-KD weights (method='proxy-kd' is off-policy only)")
    if TARGET_KEYS[0] not in inputs:
        return out
    if student_targets is None:
        raise ValueError("the batch has target rows but the student's samples got none")
    # the teacher rows' targets, sliced per row; the student rows' from student_targets, in row order
    old_counts = rmask[:, 1:].sum(1).tolist()
    old_starts = np.concatenate([[0], np.cumsum(old_counts)]).tolist()
    new_counts = out["response_mask"][:, 1:].sum(1).tolist()
    keys = list(TARGET_KEYS) + ([CONTEXT_COUNT_KEY] if CONTEXT_COUNT_KEY in inputs else [])
    student = {"target_indices": student_targets.indices, "target_logprobs": student_targets.logprobs,
               "target_tail": student_targets.tail}
    if CONTEXT_COUNT_KEY in inputs:
        if CONTEXT_COUNT not in student_targets.extras:
            raise ValueError("the batch's prior rows carry context counts but the prior's answer has none")
        student[CONTEXT_COUNT_KEY] = student_targets.extras[CONTEXT_COUNT].reshape(-1)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    s_at = 0
    for j in range(ids.shape[0]):
        if j in replaced:
            n = int(new_counts[j])
            skip = len(responses[replaced[j]]) - n  # a response from position 0 has no row for its first token
            for k in keys:
                parts[k].append(student[k][s_at + skip:s_at + skip + n])
            s_at += len(responses[replaced[j]])
        else:
            for k in keys:
                parts[k].append(inputs[k][old_starts[j]:old_starts[j + 1]])
    for k in keys:
        like = inputs[k]
        if like.dim() == 2 and parts[k]:  # the prior's K must be the batch's
            width = {p.shape[1] for p in parts[k]}
            if len(width) > 1:
                raise ValueError(f"the prior's rows have K={sorted(width)}, the batch's targets K={like.shape[1]}")
        out[k] = torch.cat([p.to(device=like.device, dtype=like.dtype) for p in parts[k]])
    if out["target_tail"].shape[0] != int(out["response_mask"][:, 1:].sum()):
        raise ValueError(f"on-policy batch: {out['target_tail'].shape[0]} target rows for "
                         f"{int(out['response_mask'][:, 1:].sum())} response tokens")
    return out
