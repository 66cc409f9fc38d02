"""A sharper lab teacher: the lab teacher sampled at a temperature τ < 1, materialised as a model of its own.

Real instruction-tuned teachers are much sharper than the lab's (tiny: 3.45 nats/token on its training text).
The sharp teacher's distribution is the original one at temperature τ, softmax(logits / τ). Rather than threading
τ through every stage, `sharpen_model` divides the output projection (lm_head weight, and bias if any) by τ —
untying it from the input embeddings first, which must not change — so the saved copy's logits ARE logits / τ.
Every stage that loads
"the teacher" (the teacher server the black-box pipeline samples at temperature 1 and whose top-k log-probabilities
it reveals, the truth the evaluation scores against, the white-box KD baseline) then sees the same sharp
distribution.

τ is chosen by bisection (`search_tau`; the mean entropy of softmax(z / τ) grows with τ) so that the mean entropy
at the teacher-forced positions of a fixed slice of the teacher's TRAINING documents (never the held-out prompts)
is at most a target. `sharpen_teacher` does it all and checks the saved copy. The lab preset that uses it is a
`bayeskd.lab.build.SharpLabPreset` (e.g. `tiny-sharp`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch


def mean_entropy(logprobs: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Mean entropy (nats) of the rows of `logprobs` [N, V] (the `valid` ones)."""
    from bayeskd.evaluation.metrics import _chunks

    # in the metrics' row chunks: no [N, V] temporaries (GBs at V = 50 k)
    h = torch.cat([torch.special.entr(logprobs[rows].float().exp()).sum(-1)
                   for rows in _chunks(len(logprobs), logprobs.shape[-1], None)]) if len(logprobs) \
        else logprobs.new_zeros(0)
    return float((h if valid is None else h[valid]).mean())


def entropy_at(logits: torch.Tensor, tau: float, chunk: int = 1024) -> float:
    """Mean entropy (nats) of softmax(logits / tau) over the rows of `logits` [N, V]."""
    total = 0.0
    for i in range(0, len(logits), chunk):
        lp = torch.log_softmax(logits[i:i + chunk].double() / tau, dim=-1)
        total += float(torch.special.entr(lp.exp()).sum())
    return total / max(len(logits), 1)


def search_tau(logits: torch.Tensor, target: float, lo: float = 1e-3, hi: float = 1.0,
               tol: float = 1e-4) -> tuple[float, float]:
    """(τ, mean entropy at τ): the largest τ in [lo, hi], to `tol` (rounded down to a multiple of it), whose mean
    entropy of softmax(logits / τ) is at most `target`. Deterministic bisection (the entropy grows with τ)."""
    if entropy_at(logits, hi) <= target:
        return hi, entropy_at(logits, hi)
    if entropy_at(logits, lo) > target:
        raise ValueError(f"even at temperature {lo} the mean entropy is {entropy_at(logits, lo):.4f} > {target}")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if entropy_at(logits, mid) <= target:
            lo = mid
        else:
            hi = mid
    tau = round(math.floor(lo / tol) * tol, 10)  # a round number, no larger than lo (up to the rounding)
    h = entropy_at(logits, tau) if tau > 0 else math.inf
    return (tau, h) if h <= target else (lo, entropy_at(logits, lo))


@torch.no_grad()
def forced_logits(model, tokenizer, docs: Sequence[str], max_len: int) -> torch.Tensor:
    """The model's logits [P, V] (float32) at every teacher-forced position of `docs`, each as <bos> doc <eos> cut
    to its first `max_len` tokens: the logits at position t-1, which predict token t, for t = 1 .. len-1."""
    model.eval()
    rows = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(docs)):  # its post-processor prepends <bos>
        ids = (list(enc.ids) + [tokenizer.eos_token_id])[:max_len]
        if len(ids) >= 2:
            rows.append(model(input_ids=torch.tensor([ids])).logits[0, :-1].float())
    if not rows:
        raise ValueError("no document has two tokens: nothing to measure the entropy on")
    return torch.cat(rows)


def sharpen_model(model, tau: float):
    """Divide the model's logits by `tau`, in place: its output projection (weight, and bias if any) is scaled by
    1 / tau. Tied input/output embeddings are untied first (in the config too): the input embeddings stay as they
    are. A model with a nonlinear logit transform (final logit soft-capping) is refused. Returns the model."""
    if not tau > 0:
        raise ValueError(f"the temperature must be > 0, got {tau}")
    configs = [model.config]
    if hasattr(model.config, "get_text_config") and model.config.get_text_config() is not model.config:
        configs.append(model.config.get_text_config())
    if any(getattr(c, "final_logit_softcapping", None) for c in configs):
        raise ValueError("final logit soft-capping: scaling lm_head does not divide the logits by a temperature")
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to scale")
    if inp is not None and (out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()):
        out.weight = torch.nn.Parameter(inp.weight.detach().clone())
    for c in configs:
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False  # or from_pretrained ties them again
    with torch.no_grad():
        out.weight.div_(tau)
        if getattr(out, "bias", None) is not None:
            out.bias.div_(tau)
    return model


def sharpen_teacher(src: str | Path, out: str | Path, docs: Sequence[str], target: float,
                    max_len: int = 128) -> dict[str, Any]:
    """Save at `out` the teacher at `src` sharpened to the temperature τ whose mean entropy on the teacher-forced
    positions of `docs` (see `forced_logits`) is at most `target` nats/token, with its tokenizer. The saved copy
    is loaded back and checked: its log-probabilities are log_softmax(original logits / τ). Returns τ, the mean
    entropy before and after (measured on the saved copy) and the check's largest error."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src))
    z = forced_logits(model, tok, docs, max_len)
    before = entropy_at(z, 1.0)
    tau, _ = search_tau(z, target)
    sharpen_model(model, tau)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    z_sharp = forced_logits(AutoModelForCausalLM.from_pretrained(str(out)), tok, docs, max_len)
    err = float((torch.log_softmax(z_sharp.double(), -1) - torch.log_softmax(z.double() / tau, -1)).abs().max())
    if not err <= 1e-3:
        raise RuntimeError(f"the sharpened teacher at {out} is not the teacher at temperature {tau} "
                           f"(log-probabilities differ by up to {err:.3g})")
    return {"tau": tau, "target": target, "entropy": entropy_at(z_sharp, 1.0), "entropy_before": before,
            "positions": int(len(z)), "docs": len(docs), "max_len": max_len, "max_abs_logprob_error": err}
