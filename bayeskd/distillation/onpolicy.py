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
- `scored_evidence` / `scored_targets` (onpolicy_targets "scored"): the teacher server's scores of the samples
  (`bayeskd.distillation.onpolicy_scores`) as evidence rows beside the student's rows (`SCORED_KEYS`), and the
  posterior (prior rows x the proxy's dense logits, `combine`) conditioned on them (`condition`), exactly as
  `estimate-posterior` conditions: a finished sparse target, which the fused online loss (prior rows x proxy
  inside the kernel) cannot take, so the trainer runs the student's rows through their own KD call.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from bayeskd.core.combine import combine
from bayeskd.core.condition import condition
from bayeskd.core.sparse import SparseDist
from bayeskd.distillation.targets import CONTEXT_COUNT_KEY, TARGET_KEYS, WEIGHT_KEY
from bayeskd.core.names import CONTEXT_COUNT
from bayeskd.teacher_forcing import pad_batch

ONPOLICY_KEY = "onpolicy_mask"  # [B] bool: the rows that hold the student's samples
# scored samples: the teacher's evidence at the student's rows (in batch order, the student's rows only): student
# ids int32 [Ms, E] (-1 padding), probabilities [Ms, E], lower-bound flags [Ms, E], the top list's cap [Ms]
SCORED_KEYS = ("onpolicy_ev_indices", "onpolicy_ev_probs", "onpolicy_ev_lower", "onpolicy_ev_cap")


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


def scored_evidence(batch: dict[str, torch.Tensor], rows: torch.Tensor, responses: Sequence[torch.Tensor],
                    evidence) -> dict[str, torch.Tensor]:
    """`SCORED_KEYS` of a built batch (`build_batch`'s output for `rows`) from `evidence` (a
    `bayeskd.posterior.evidence.Evidence`, one row per sampled token, response after response): the student's
    rows in the batch's order (a response from position 0 has no row for its first token)."""
    counts = batch["response_mask"][:, 1:].sum(1).tolist()
    keep, at = [], 0
    for i, j in enumerate(rows.tolist()):
        n = len(responses[i])
        keep.extend(range(at + n - int(counts[j]), at + n))
        at += n
    if at != evidence.num_rows:
        raise ValueError(f"the teacher's evidence has {evidence.num_rows} rows for {at} sampled tokens")
    ev = evidence[np.asarray(keep, np.int64)]
    device = batch["input_ids"].device
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
            for k, v in zip(SCORED_KEYS, (ev.indices, ev.probs, ev.lower, ev.cap))}


def scored_targets(prior: SparseDist, proxy_logits: torch.Tensor, evidence: dict[str, torch.Tensor], *,
                   mode: str = "log_linear", a: float = 1.0, b: float = 1.0, c: float = 1.0,
                   w: float = 0.5) -> SparseDist:
    """The student's rows' targets from scored samples: the posterior of the prior rows and the proxy's dense
    logits (`combine`, the online mode's posterior) conditioned on the teacher's revealed entries (`condition`,
    as estimate-posterior does; a row without evidence is the posterior itself)."""
    post = combine(prior, proxy_logits, mode, a=a, b=b, c=c, w=w)
    idx, probs, lower, cap = (evidence[k].to(post.indices.device) for k in SCORED_KEYS)
    # a top list reaching probabilities that underflow to 0 still caps the rest at almost nothing
    return condition(post, idx, probs, lower, cap=cap.double().clamp(min=1e-300))
