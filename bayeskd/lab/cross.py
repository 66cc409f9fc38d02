"""The lab's second teacher, with a tokenizer of its own: the cross-tokenizer path of the revealed log-probabilities.

Teacher B has the lab teacher's size and training text; its tokenizer is a byte-level BPE with `VOCAB_FACTOR` times
the lab's vocabulary, trained on the same text (a lab with a real tokenizer, `tiny-gpt2`: Whisper's multilingual one,
`bayeskd.lab.real_tokenizers`). The pipeline is the lab's (student tokenizer, prior, aligned proxy,
calibrated combination); B's revealed top-k reach the student's vocabulary by byte offsets, as lower bounds, at the
positions where both tokenizers start a token (`bayeskd.posterior.evidence`).

There is no truth over the student's tokens here: B's distribution lives over B's tokens, and the student's
next-token marginal would need every continuation of every B token. So the comparison is at the sequence level:
each student's NLL per byte of held-out B text. B's entropy is common to all students, so differences of NLL per
byte are differences of KL(B ‖ student) per byte, exactly, whatever the tokenizers.

A sharp lab (`tiny-sharp`) does not sharpen B: it uses its base lab's teacher B as it is (built or reused there).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bayeskd.lab.build import LabPreset, split_corpus, train_lab_model
from bayeskd.lab.http_sampling import sample_teacher
from bayeskd.lab.recipe import mean_std
from bayeskd.lab.real_tokenizers import REAL_TOKENIZERS, save_real_tokenizer
from bayeskd.integrity import atomic_write_bytes

VOCAB_FACTOR = 1.5
VERSION = 1
METHODS = ("sft", "posterior-kd-text", "posterior-kd-k5", "posterior-kd")  # text only, top-5, top-20 conditioned
TARGETS = {"posterior-kd-text": ("posterior_text", dict(no_evidence=True)),
           "posterior-kd-k5": ("posterior_k5", dict(evidence_top_k=5)),
           "posterior-kd": ("posterior", {})}


def build_teacher_b(lab_root: str, preset: LabPreset, progress: bool = True) -> str:
    """Build (or reuse) teacher B under `lab_root/teacher_b/` (its model and tokenizer in `teacher/`)."""
    from transformers import AutoTokenizer

    from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer

    base = Path(lab_root) / "teacher_b"
    # the manifest names B's vocabulary: its BPE's size, or its real tokenizer's file
    vocab = int(round(preset.vocab_size * VOCAB_FACTOR)) if preset.tokenizer == "bpe" else \
        REAL_TOKENIZERS[preset.tokenizer][1]
    want = {"version": VERSION, "preset": preset.to_dict(), "vocab_size": vocab}
    manifest = base / "teacher_b.json"
    if manifest.exists() and {k: v for k, v in json.loads(manifest.read_text()).items() if k in want} == want:
        return str(base / "teacher")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    teacher_docs, proxy_docs, _ = split_corpus(embedded_corpus(), preset.n_prompts, preset.seed)
    if preset.tokenizer == "bpe":
        train_bpe_tokenizer(teacher_docs + proxy_docs, vocab, base / "tokenizer")  # the lab tokenizer's text
    else:  # converted once for every lab under the lab root
        save_real_tokenizer(vocab, base / "tokenizer", Path(lab_root).parent)
    tok = AutoTokenizer.from_pretrained(base / "tokenizer")
    stats = train_lab_model(preset.teacher, tok, teacher_docs, preset, preset.seed + 3000, base / "teacher",
                            f"lab {preset.name}: teacher B", progress)
    atomic_write_bytes(manifest, (json.dumps({**want, "stats": stats}, indent=2)
                                  + "\n").encode())  # written last: a build without it is redone
    return str(base / "teacher")


def nll_per_byte(model, tokenized, token_sizes: np.ndarray) -> float:
    """Σ −log p(y) over every response row (EOS included) / Σ response bytes, teacher-forced; `token_sizes[i]`:
    the bytes of token i."""
    import torch

    from bayeskd.teacher_forcing import target_logprobs

    lp, _ = target_logprobs(model, tokenized)
    ys = torch.from_numpy(np.concatenate(tokenized.response_sequences()).astype(np.int64))
    return float(-lp.gather(1, ys[:, None]).sum() / max(int(token_sizes[ys.numpy()].sum()), 1))


def run_cross(paths: dict[str, str], run: Path, cfg, prompts: Sequence[str], held_prompts: Sequence[str],
              proxy: str, combo: dict[str, Any], preset: LabPreset, progress: bool,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Sample teacher B over HTTP, estimate the posterior with the student's tokenizer (text only, conditioned on
    B's top-5 and top-20), distill students (`cfg.seeds` seeds) and score them on held-out B text."""
    from transformers import AutoModelForCausalLM

    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.distillation.trainer import distill
    from bayeskd.posterior.estimate import estimate_posterior
    from bayeskd.priors.estimate import estimate_prior
    from bayeskd.token_bytes import token_bytes_table

    base = preset.base_preset()  # a sharp lab: its base lab's teacher B, not sharpened
    teacher_b = build_teacher_b(str(Path(paths["root"]).parent / base.name), base, progress)
    d = run / "cross"
    d.mkdir(parents=True, exist_ok=True)
    train, held = d / "teacher_train.jsonl", d / "teacher_heldout.jsonl"
    sample_teacher(teacher_b, [(prompts, train, preset.seed + 7, cfg.samples_per_prompt, cfg.top_logprobs),
                               (held_prompts, held, preset.seed + 8, 1, 0)], cfg, progress, name="lab-teacher-b")
    estimate_prior(str(train), paths["tokenizer"], out=str(d / "prior"), order=cfg.order, top_k=cfg.top_k,
                   write_topk=True, codec="raw")
    evidence: dict[str, Any] = {}
    for method, (name, kw) in TARGETS.items():
        s = estimate_posterior(str(train), str(d / "prior"), proxy, str(d / name), top_k=cfg.top_k, batch_size=16,
                               codec="raw", **kw, **combo)
        if s.get("evidence"):
            evidence[method] = {k: s["evidence"][k] for k in (
                "share_with_evidence", "records_cross_tokenizer", "records_with_logprobs", "mean_mass", "rows",
                "cross_entries", "cross_entries_dropped", "cross_rows_dropped_in", "cross_rows_cap_lifted")}
    tok = load_tokenizer(paths["tokenizer"])
    sizes = np.array([len(b) for b in token_bytes_table(tok)], np.int64)
    held_tok = tokenize_records(load_teacher_records(str(held))[0], tok)
    per_seed: dict[str, list[float]] = {"student init": [nll_per_byte(
        AutoModelForCausalLM.from_pretrained(paths["student"]), held_tok, sizes)]}
    for method in METHODS:
        per_seed[method] = []
        for seed in range(cfg.seeds):
            out = d / "students" / f"{method}-s{seed}"
            if not (out / "summary.json").exists():
                targets = str(d / TARGETS[method][0]) if method in TARGETS else None
                distill(str(train), paths["student"], str(out), targets=targets, **cfg.train_kwargs(seed, progress, kd=targets is not None))
            per_seed[method].append(nll_per_byte(AutoModelForCausalLM.from_pretrained(str(out)), held_tok, sizes))
            log(f"[lab] teacher B, student {method} seed {seed}: nll/byte={per_seed[method][-1]:.4f}")
    summary = {m: mean_std(v) for m, v in per_seed.items()}
    return {"teacher_vocab": len(load_tokenizer(teacher_b)), "student_vocab": len(tok),
            "train_records": sum(1 for _ in train.open()), "heldout_records": len(held_tok),
            "evidence": evidence, "nll_per_byte": summary, "per_seed": per_seed}

