"""The lab at a real vocabulary (preset tiny-gpt2: GPT-2's 50,256 BPE tokens, teacher B on Whisper's multilingual
ones; bayeskd.lab.real_tokenizers), measured without training a model except (b):

(a) evidence coverage across the tokenizer pair: the share of student (GPT-2) token positions of held-out corpus
    responses where a teacher-B token starts too, so B's revealed top-k reach them (`bayeskd.posterior.evidence`,
    the alignment the lab's cross-tokenizer run uses; every B token revealed), beside the lab's trained pair
    (BPE 1024 / 1536, preset tiny) and a same-tokenizer control;
(b) top-K mass coverage at K = 20 and 64: a trained lab teacher's mass in its own top-K on 100 held-out
    responses, for the tiny-gpt2 lab (and the tiny lab beside it) when --root holds them built
    (`bayeskd lab run --preset tiny-gpt2 --root ROOT`);
(c) the compact codec's bytes per top-64 entry at V = 50,260 beside the tiny lab's V = 1,024 (bayeskd.codec);
(d) the fused posterior + forward-KL loss (bayeskd.losses, PyTorch path) forward + backward on CPU at V = 50,260,
    fp32, against the plain PyTorch references in the same run: `sparse_kd_loss(combine(...))` (the library's
    autograd reference, same value) and a dense [N, V] posterior with F.kl_div.

    nice -n 10 python benchmarks/bench_real_tokenizers.py [--texts 300] [--rows 256] [--root runs/lab]

Writes benchmarks/results/real_tokenizers.json. Needs the lab-real extra (openai-whisper, tiktoken).
"""
from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, command, print_table, time_cpu, write_json


def coverage(records_text: list[str], student, teacher) -> dict:
    """Evidence rows of the student over responses whose every teacher token is revealed (top-1, the token)."""
    from bayeskd.core.sparse import tokenizer_fingerprint
    from bayeskd.data import tokenize_records
    from bayeskd.posterior.evidence import evidence_rows
    from bayeskd.token_bytes import token_bytes_table

    table = token_bytes_table(teacher)
    half = math.log(0.5)
    records = []
    for prompt, response in records_text:
        ids = teacher.backend_tokenizer.encode(response, add_special_tokens=False).ids  # no length warning
        lps = [{"token": str(t), "bytes": list(table[t]), "logprob": half,
                "top_logprobs": [{"token": str(t), "bytes": list(table[t]), "logprob": half}]} for t in ids]
        # "length": no EOS row, so every row is a response token
        records.append({"prompt": prompt, "response": response, "finish_reason": "length",
                        "teacher_tokenizer": tokenizer_fingerprint(teacher), "logprobs": lps})
    tokenized = tokenize_records(records, student)
    _, report = evidence_rows(records, tokenized, student)
    n_bytes = sum(len(r.encode()) for _, r in records_text)
    return {"rows": report["rows"], "rows_with_evidence": report["rows_with_evidence"],
            "coverage": report["share_with_evidence"], "student_bytes_per_token": n_bytes / report["rows"],
            "teacher_bytes_per_token": n_bytes / report["teacher_tokens"]}


def codec_bytes(vocab: int, rows: int, k: int = 64, seed: int = 0) -> dict:
    """Compact bytes per entry of top-k rows of softmax(2.5 N(0, 1)) logits over `vocab` tokens."""
    from bayeskd.codec import encode

    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(rows, vocab, generator=g) * 2.5, -1)
    top, idx = lp.topk(k, dim=1)
    tail = (1 - top.exp().sum(1)).clamp_min(0)
    tensors, params = encode(idx.int(), top, tail, vocab)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"V": vocab, "K": k, "id_bits": params["id_bits"], "logprob_bits": params["logprob_bits"],
            "compact_bytes_per_entry": total / (rows * k), "raw_bytes_per_entry": (8 * k + 4) / k}


def loss_times(n: int, vocab: int, k: int = 64, seed: int = 0) -> dict:
    """Forward + backward milliseconds at [n, vocab] fp32: fused vs the references, and the fused-vs-reference gaps."""
    import torch.nn.functional as F

    from bayeskd.core.combine import combine
    from bayeskd.core.sparse import SparseDist
    from bayeskd.losses import fused_posterior_kd, sparse_kd_loss

    g = torch.Generator().manual_seed(seed)

    def rand_dist() -> SparseDist:
        idx = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)]).int()
        p = torch.softmax(torch.randn(n, k, generator=g), 1) * 0.7
        return SparseDist(idx, p.log(), torch.full((n,), 0.3), vocab)

    prior, proxy, z0 = rand_dist(), rand_dist(), torch.randn(n, vocab, generator=g)

    def run(name: str):
        z = z0.clone().requires_grad_(True)
        if name == "fused":
            loss = fused_posterior_kd(z, prior, proxy, backend="torch")
        elif name == "reference":
            loss = sparse_kd_loss(z, combine(prior, proxy))
        else:  # dense: every token its own category, the tails spread uniformly ([N, V] target)
            p = prior.to_dense() * proxy.to_dense()
            loss = F.kl_div(F.log_softmax(z, 1), p / p.sum(1, keepdim=True), reduction="none").sum(1)
        loss.sum().backward()
        return loss.detach(), z.grad

    (lf, gf), (lr, gr) = run("fused"), run("reference")
    out = {"rows": n, "V": vocab, "K": k, "max_abs_loss_diff": float((lf - lr).abs().max()),
           "max_abs_grad_diff": float((gf - gr).abs().max())}
    for name in ("fused", "reference", "dense"):
        out[f"{name}_ms"] = time_cpu(lambda name=name: run(name), reps=3)
    return out


def topk_mass(model_dir: Path, texts: list[tuple[str, str]], ks: tuple[int, ...] = (20, 64)) -> dict:
    """The trained teacher's probability mass in its own top-k at every response position of `texts` (teacher
    forcing on prompt + response; mean, and the 10th percentile): how much a top-k target keeps at this V."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    masses: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    with torch.no_grad():
        for prompt, response in texts:
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            r_ids = tok(response, add_special_tokens=False)["input_ids"]
            if not p_ids or not r_ids or len(p_ids) + len(r_ids) > model.config.max_position_embeddings:
                continue
            ids = torch.tensor([p_ids + r_ids])
            probs = model(ids).logits[0, len(p_ids) - 1:-1].float().softmax(-1)
            top = probs.topk(max(ks), dim=-1).values.cumsum(-1)
            for k in ks:
                masses[k].append(top[:, k - 1])
    out = {"model": str(model_dir), "V": model.config.vocab_size, "positions": int(sum(len(m) for m in masses[ks[0]]))}
    for k in ks:
        m = torch.cat(masses[k])
        out[f"top{k}_mass_mean"], out[f"top{k}_mass_p10"] = float(m.mean()), float(m.quantile(0.1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=300, help="held-out corpus responses for (a)")
    ap.add_argument("--rows", type=int, default=256, help="loss rows for (d)")
    ap.add_argument("--root", default=None, help="a labs root whose converted tokenizers to reuse (default: a "
                    "temporary one)")
    ap.add_argument("--out", default=str(RESULTS / "real_tokenizers.json"))
    args = ap.parse_args()
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer
    from bayeskd.lab.build import PRESETS, split_corpus
    from bayeskd.lab.cross import VOCAB_FACTOR
    from bayeskd.lab.real_tokenizers import CACHE_DIR, REAL_TOKENIZERS, real_tokenizer

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.root or tmp.name)
    student_asset, teacher_asset = REAL_TOKENIZERS["gpt2"]
    gpt2 = AutoTokenizer.from_pretrained(real_tokenizer(student_asset, root / CACHE_DIR))
    multi = AutoTokenizer.from_pretrained(real_tokenizer(teacher_asset, root / CACHE_DIR))
    tiny = PRESETS["tiny"]
    teacher_docs, proxy_docs, held = split_corpus(embedded_corpus(), args.texts, tiny.seed)
    texts = [(r["prompt"], r["response"]) for r in held]
    bpe = {v: AutoTokenizer.from_pretrained(train_bpe_tokenizer(teacher_docs + proxy_docs, v, Path(tmp.name) / str(v)))
           for v in (tiny.vocab_size, int(round(tiny.vocab_size * VOCAB_FACTOR)))}
    bpe_s, bpe_t = bpe.values()
    pairs = [("gpt2 <- whisper multilingual", gpt2, multi), ("gpt2 <- gpt2 (control)", gpt2, gpt2),
             (f"lab tiny: bpe {len(bpe_s)} <- bpe {len(bpe_t)}", bpe_s, bpe_t)]
    cov = [{"pair": name, "student_V": len(s), "teacher_V": len(t), **coverage(texts, s, t)} for name, s, t in pairs]
    codec = [codec_bytes(v, rows=1000) for v in (len(gpt2), tiny.vocab_size)]
    loss = loss_times(args.rows, len(gpt2))
    # trained lab teachers under --root (`bayeskd lab run --preset tiny-gpt2`; tiny's beside it for comparison)
    mass = [{"lab": name, **topk_mass(root / name / "teacher", texts[:100])} for name in ("tiny-gpt2", "tiny")
            if (root / name / "teacher" / "config.json").exists()]
    tmp.cleanup()

    print(f"(a) evidence coverage on {len(texts)} held-out responses (student <- teacher B)")
    print_table(cov, ["pair", "student_V", "teacher_V", "rows", "coverage", "student_bytes_per_token",
                      "teacher_bytes_per_token"])
    if mass:
        print("(b) trained lab teachers' probability mass in their own top-k, held-out responses")
        print_table(mass, ["lab", "V", "positions", *(k for k in mass[0] if k.startswith("top"))])
    else:
        print("(b) top-64 mass coverage: needs a trained tiny-gpt2 teacher under --root (not found)")
    print("(c) compact codec, top-64 rows")
    print_table(codec, ["V", "id_bits", "logprob_bits", "compact_bytes_per_entry", "raw_bytes_per_entry"])
    print(f"(d) posterior + forward KL, forward + backward, CPU fp32, {loss['rows']} rows x V={loss['V']}, "
          f"K={loss['K']}")
    print_table([{**loss, **{k: f"{loss[k]:.1e}" for k in ("max_abs_loss_diff", "max_abs_grad_diff")}}],
                ["fused_ms", "reference_ms", "dense_ms", "max_abs_loss_diff", "max_abs_grad_diff"])
    write_json(args.out, {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, "
                                     f"{platform.python_version()}, torch {torch.__version__}",
                          "command": command(), "seconds": time.perf_counter() - t0,
                          "evidence_coverage": cov,
                          "topk_coverage_k64": mass or "not measured: a property of a trained teacher's "
                                                       "distributions (no tiny-gpt2 lab under --root)",
                          "codec": codec, "loss": loss})
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
