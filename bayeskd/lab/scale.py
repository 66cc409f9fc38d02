"""The lab at scale: more prompts, the corpus curve's extra columns and what estimation costs as the corpus grows.

    sentence_prompts   the "sentences" prompt pool: every sentence (or line) opening of the teacher and proxy
                       documents, alone and with the sentence before it, none sharing text with a held-out prompt
    curve_point        at one point of the corpus curve: the suffix prior, the n-gram and suffix posteriors
                       recalibrated on that point's priors (calibration records only), the best single component
    point_proxy        the proxy a user with only the point's records has: the pipeline's when its alignment saw
                       only records among them, else one aligned the same way on the point's own records
    estimation_costs   wall time and peak memory (RSS) of `estimate_prior` and `estimate_posterior` on the first n
                       teacher records, each in a fresh Python process (measurements never accumulate)

Honest as the rest of the lab: priors are scored on held-out teacher text (never counted); the recalibration and the
suffix prior's beta read only the calibration records, leave-one-out; nothing at a point of the curve (the prior,
the proxy's alignment, the students' targets) has seen a record beyond the point's first n.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch


def _sentences(doc: str) -> list[str]:
    """The sentence (or line) openings of `doc` that the document continues, in order (`split_prompt_response`
    applied again and again to the rest)."""
    from bayeskd.corpus import split_prompt_response

    out, rest = [], doc
    while (pair := split_prompt_response(rest)) is not None:
        out.append(pair[0])
        rest = pair[1]
    return out


def shares_text(a: str, b: str) -> bool:
    """Equal, or one contains the other."""
    return a in b or b in a


def sentence_prompts(docs: Sequence[str], held_prompts: Sequence[str]) -> list[str]:
    """Distinct prompts from `docs` (deterministic, in document order): every sentence opening that the document
    continues, then the same with the sentence before it (a longer context). A prompt that shares text with a
    held-out prompt (`shares_text`) is dropped."""
    singles, pairs = [], []
    for doc in docs:
        s = _sentences(doc)
        singles += s
        pairs += [f"{a} {b}" for a, b in zip(s, s[1:])]
    held = list(dict.fromkeys(held_prompts))
    out = []
    for p in dict.fromkeys(singles + pairs):
        if not any(shares_text(p, h) for h in held):
            out.append(p)
    return out


# -------------------------------------------------------------------------------------------- the curve's columns

def curve_point(n: int, train, held, t_lp: torch.Tensor, valid: torch.Tensor, proxy, proxy_held, cal: list[int],
                ngram, top_k: int) -> dict[str, Any]:
    """The extra columns of the corpus curve for priors counted on the first `n` training records (`train`,
    tokenized; `ngram`: the n-gram prior counted on them): KL(teacher‖estimate) on held-out text (`held`, truth
    `t_lp`/`valid`) of the suffix prior (of the n-gram's order), of the n-gram and suffix priors each combined with
    the proxy (`proxy_held` rows) by the combination that gives the calibration records `cal` (those among the first
    n: leave-one-out) the lowest teacher-token NLL (`proxy`: the pipeline's ProxyPosterior), the posterior the lower
    calibration NLL picks, and the suffix prior's margin over the n-gram's."""
    from bayeskd.core.combine import combine
    from bayeskd.evaluation.metrics import kl_teacher_to_estimate
    from bayeskd.posterior.calibrate import calibrate_combination
    from bayeskd.priors.suffix import SuffixPrior

    def kl(est) -> float:
        return float(kl_teacher_to_estimate(t_lp, est)[valid].mean())

    resp, prm = train.response_sequences()[:n], train.prompt_sequences()[:n]
    V = train.vocab_size
    seqs, ctxs = held.response_sequences(), held.prompt_sequences()
    suffix = SuffixPrior(order=ngram.order, vocab_size=V).fit(resp, prm)
    rows = {"n-gram": ngram.topk(seqs, top_k)}  # (the curve's "prior" column)
    inside = [j for j, i in enumerate(cal) if i < n]  # calibration records counted here: queried leave-one-out
    out: dict[str, Any] = {"calibration_records": len(inside)}
    if inside:
        c_resp, c_prm = [resp[cal[j]] for j in inside], [prm[cal[j]] for j in inside]
        beta, _ = suffix.choose_beta(c_resp, c_prm, k=top_k)
        out["suffix_beta"] = list(np.atleast_1d(beta).tolist())
    rows["suffix"] = suffix.topk(seqs, top_k, contexts=ctxs)
    out["suffix prior"] = kl(rows["suffix"])
    out["suffix_margin"] = out["suffix prior"] - kl(rows["n-gram"])  # < 0: the suffix prior is better
    if inside:
        y = torch.from_numpy(np.concatenate(c_resp).astype(np.int64))
        q_cal = proxy.proxy_topk(train, [cal[j] for j in inside], V)
        best = {}
        for name, prior in (("n-gram", ngram), ("suffix", suffix)):
            p_cal = prior.topk(c_resp, top_k, leave_one_out=True, contexts=c_prm)
            settings, table = calibrate_combination(p_cal, q_cal, y, top_k=top_k)
            post = kl(combine(rows[name], proxy_held, top_k=top_k, **settings))
            out[f"{name} posterior (recalibrated)"] = post
            best[name] = (table[0]["nll"], post, {k: v for k, v in settings.items() if k != "theta"})
            if name == "n-gram":  # (what the curve's students combine with, `curve_students`)
                out["n-gram combination"] = json.loads(json.dumps(settings))
        chosen = min(best, key=lambda k: best[k][0])  # by the calibration NLL, not by the truth
        out["chosen"] = f"{chosen} prior x proxy, {best[chosen][2]}"
        out["chosen posterior"] = best[chosen][1]
    return out


def point_dir(run: Path, cfg, n: int) -> Path:
    """run/curve_students/records_<n>/: a run directory of the curve's point at n records, with a copy of the first
    n training records (in the run's records format) and of the held-out ones."""
    from bayeskd.integrity import atomic_write_bytes
    from bayeskd.lab.records import head_records, train_records

    d = run / "curve_students" / f"records_{n}"
    d.mkdir(parents=True, exist_ok=True)
    sub = train_records(d, cfg)
    if not sub.exists():
        atomic_write_bytes(d / "teacher_heldout.jsonl", (run / "teacher_heldout.jsonl").read_bytes())
        head_records(train_records(run, cfg), sub, n)  # written last: the copy is whole
    return d


def point_proxy(paths: dict[str, str], run: Path, cfg, n: int, pipeline_proxy: str,
                align: Callable[..., dict[str, Any]] | None) -> tuple[str, int]:
    """(the proxy directory, the records it was aligned on) for the point of the curve at the first `n` training
    records: what a user who has only those records would have. The pipeline's proxy when it is not aligned, or
    when its alignment read only records among the first n; else the lab's alignment (`align(data, out,
    holdout)`) of the base proxy on the point's records, the scored and calibration ones held out as always, in
    the point's directory (reused when there); the base proxy when no record is left to align on."""
    from bayeskd.lab.records import count_records, train_records

    if not cfg.align:
        return pipeline_proxy, 0
    scored = cfg.eval_records + cfg.calibration_records
    total = count_records(train_records(run, cfg))
    end = total if cfg.align_records is None else min(total, scored + cfg.align_records)  # (`_align_holdout`)
    if end <= n:
        return pipeline_proxy, max(0, end - scored)
    if n <= scored or align is None:
        return paths["proxy"], 0
    d = point_dir(run, cfg, n)
    summary = align(str(train_records(d, cfg)), d / "aligned_proxy", range(scored))
    return summary["final"], n - scored


# ------------------------------------------------------------------------------------------------- estimation cost

def _child(job: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """In the fresh process: run one estimation job; its wall time and this process's peak RSS before and after."""
    import resource
    import time

    from bayeskd.posterior.estimate import estimate_posterior
    from bayeskd.priors.estimate import estimate_prior

    def rss_mb() -> float:
        # VmHWM: this address space's peak (new at exec); ru_maxrss would keep the spawning process's peak on Linux
        status = Path("/proc/self/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return r / (1 << 20) if sys.platform == "darwin" else r / 1024

    fn = {"estimate-prior": estimate_prior, "estimate-posterior": estimate_posterior}[job]
    base = rss_mb()
    t0 = time.perf_counter()
    summary = fn(**kwargs)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": rss_mb(), "import_rss_mb": base,
            "records": summary.get("records")}


def measure(job: str, kwargs: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """`_child(job, kwargs)` in a new Python process (`python -m bayeskd.lab.scale`): its wall time (the job alone,
    not the imports) and peak RSS, the imports' RSS (`import_rss_mb`) beside it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "bayeskd.lab.scale", job, json.dumps(kwargs)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"measuring {job} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def estimation_costs(data: str, n: int, tokenizer: str, proxy: str, *, order: int, top_k: int,
                     combo: dict[str, Any] | None = None, workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the pipeline's estimate-prior (n-gram, top-K rows written) and text-only estimate-posterior (the
    combination `combo` with `proxy`) cost on the first `n` records of `data` (copied to their own file first,
    untimed): {"estimate-prior": {...}, "estimate-posterior": {...}} with seconds, peak RSS (MiB), the tokens, and
    seconds per 1k tokens. Each job runs in a fresh process; its outputs are removed after."""
    from bayeskd.lab.records import head_records  # (here, not at the top: the measured child imports less)

    combo = {k: v for k, v in (combo or {}).items()}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="curve_cost_") as tmp:
        tmp = Path(tmp)
        records = tmp / f"records{Path(data).suffix}"  # (in `data`'s format: JSONL or Parquet)
        head_records(Path(data), records, n)
        prior = measure("estimate-prior", dict(data=str(records), tokenizer=tokenizer,
                                                out=str(tmp / "prior"), order=order, top_k=top_k, write_topk=True,
                                                codec="raw"))
        tokens = json.loads((tmp / "prior" / "summary.json").read_text()).get("tokens")
        post = measure("estimate-posterior", dict(data=str(records), prior_dir=str(tmp / "prior"),
                                                   proxy=proxy, out=str(tmp / "posterior"), top_k=top_k,
                                                   batch_size=16, codec="raw", no_evidence=True, calibrate=False,
                                                   **combo))
    out = {"tokens": tokens}
    for name, m in (("estimate-prior", prior), ("estimate-posterior", post)):
        out[name] = {**m, "seconds_per_1k_tokens": 1000.0 * m["seconds"] / max(1, tokens or 1)}
    return out


# ------------------------------------------------------------------------------------------------- report

REFERENCE_TOKENS = 42_000  # the corpus of the tiny run the scale targets compare with
POSTERIOR = "n-gram posterior (recalibrated)"  # the pipeline's calibrated text-only posterior at each point


def scale_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The scale targets, from a report whose corpus curve has the scale columns (`curve_scale`): the calibrated
    text-only posterior at the largest corpus over its value at the point nearest 42k tokens (<= 0.6), below every
    single component at every point (those with recalibrated posteriors), cost per token at the largest corpus at
    most 1.5x that at the reference (each job's fixed costs included: ratios below 1 are those amortised), and
    text-only posterior-KD closing >= 85% of the SFT -> white-box gap. Empty without the scale columns."""
    curve = [r for r in (report.get("corpus_curve") or [])[1:] if POSTERIOR in r]
    if not curve:
        return {}
    first = min(curve, key=lambda r: abs(r["tokens"] - REFERENCE_TOKENS))
    last = curve[-1]
    out: dict[str, Any] = {"scale_reference_tokens": first["tokens"], "scale_tokens": last["tokens"],
                           "scale_posterior_over_reference": last[POSTERIOR] / first[POSTERIOR]}
    out["scale_posterior_le_0.6_reference"] = bool(out["scale_posterior_over_reference"] <= 0.6)
    out["scale_posterior_below_every_component"] = all(
        r[POSTERIOR] < min(r["prior"], r["suffix prior"], r["proxy"]) for r in curve)
    out["scale_suffix_margin"] = [round(r["suffix_margin"], 4) for r in curve]
    if all("costs" in r for r in (first, last)):
        for job in ("estimate-prior", "estimate-posterior"):
            a, b = (r["costs"][job]["seconds_per_1k_tokens"] for r in (first, last))
            out[f"scale_{job}_cost_per_token_ratio"] = b / a  # < 1: the fixed costs (loading models) amortised
            out[f"scale_{job}_cost_per_token_growth_le_1.5x"] = bool(b <= 1.5 * a)
            out[f"scale_{job}_peak_rss_mb"] = [round(r["costs"][job]["peak_rss_mb"], 1) for r in curve
                                               if "costs" in r]
    s = (report.get("students") or {}).get("summary", {})
    if all(m in s for m in ("sft", "posterior-kd-text", "white-box")):
        sft, text, wb = (s[m]["kl_tf"]["mean"] for m in ("sft", "posterior-kd-text", "white-box"))
        if sft > wb:
            out["scale_gap_closed_posterior_kd_text_ge_85pct"] = bool((sft - text) / (sft - wb) >= 0.85)
    return out


def format_scale(report: dict[str, Any]) -> list[str]:
    """Markdown lines: the corpus curve's scale columns, the estimation costs and the curve's students (empty
    without them)."""
    rows = [r for r in (report.get("corpus_curve") or [])[1:] if "suffix prior" in r]
    if not rows:
        return _format_curve_students(report.get("curve_students") or [])
    cols = ["prior", "suffix prior", "proxy", POSTERIOR, "suffix posterior (recalibrated)", "chosen posterior"]
    lines = ["The corpus curve at scale: KL(teacher‖estimate) on held-out teacher text, the posteriors recalibrated "
             "at each point on the calibration records (the chosen one: the lower calibration NLL), the suffix "
             "prior's margin over the n-gram's (< 0: better); each point's proxy aligned on no record beyond the "
             "point (how many it read):", "",
             "| tokens | n-gram prior | suffix prior | proxy | n-gram posterior | suffix posterior | chosen | "
             "chosen / best component | suffix margin | proxy aligned on |", "|---:|" + "---:|" * 9]
    for r in rows:
        vals = " | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else "-" for c in cols)
        ratio = f"{r['chosen posterior'] / r['best_component']:.3f}" if "chosen posterior" in r else "-"
        lines.append(f"| {r['tokens']} | {vals} | {ratio} | {r['suffix_margin']:+.4f} | "
                     f"{r.get('proxy_records', '-')} |")
    costed = [r for r in rows if "costs" in r]
    if costed:
        lines += ["", "What estimation costs (each job in a fresh process on the first records; peak RSS includes "
                  "the imports' RSS, shown apart):", "",
                  "| tokens | estimate-prior s | s / 1k tokens | peak RSS MiB | estimate-posterior s | s / 1k tokens | "
                  "peak RSS MiB | imports' RSS MiB |", "|---:|" + "---:|" * 7]
        for r in costed:
            p, q = r["costs"]["estimate-prior"], r["costs"]["estimate-posterior"]
            lines.append(f"| {r['tokens']} | {p['seconds']:.1f} | {p['seconds_per_1k_tokens']:.3f} | "
                         f"{p['peak_rss_mb']:.0f} | {q['seconds']:.1f} | {q['seconds_per_1k_tokens']:.3f} | "
                         f"{q['peak_rss_mb']:.0f} | {p['import_rss_mb']:.0f} |")
    lines.append("")
    return lines + _format_curve_students(report.get("curve_students") or [])


def _format_curve_students(points: list[dict[str, Any]]) -> list[str]:
    if not points:
        return []
    methods = list(points[0]["summary"])
    lines = ["Students at points of the corpus curve (the same training budget at each; targets from the prior "
             "counted on that many records; KL(teacher‖student) teacher-forced on the test prompts; gap closed: "
             "text-only posterior-KD's share of SFT -> white-box):", "",
             "| records | tokens | " + " | ".join(methods) + " | gap closed (text only) |",
             "|---:|---:|" + "---:|" * (len(methods) + 1)]
    for pt in points:
        s = pt["summary"]
        cells = " | ".join(f"{s[m]['kl_tf']['mean']:.4f} ± {s[m]['kl_tf']['std']:.4f}" for m in methods)
        gap = pt.get("gap_closed_text")
        lines.append(f"| {pt['samples']} | {pt['tokens']} | {cells} | {'-' if gap is None else f'{gap:.3f}'} |")
    return lines + [""]


CURVE_STUDENT_METHODS = ("sft", "posterior-kd-text", "posterior-kd", "white-box")


def curve_students(paths: dict[str, str], run: Path, cfg, tok, progress: bool, log, pipeline_proxy: str,
                   curve: list[dict[str, Any]], combo: dict[str, Any],
                   align: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Students at the shares `cfg.curve_students` of the corpus: for the first n training records, in their own
    run directory (`point_dir`), the n-gram prior counted on them and the posterior shards (conditioned and text
    only) with the point's proxy (`point_proxy`) in the combination recalibrated at that point of the curve
    (`curve_point`; `combo` where the curve has no such point), then
    `bayeskd.lab.students.students` with `cfg`'s recipe (already chosen: nothing is chosen again) and its methods
    among CURVE_STUDENT_METHODS, at `cfg.student_max_steps` steps (the same budget at every point)."""
    import shutil
    from dataclasses import replace

    from bayeskd.integrity import atomic_write_json
    from bayeskd.lab.records import count_records, train_records
    from bayeskd.lab.students import POSTERIOR_DIR, TEXT_DIR, students
    from bayeskd.posterior.estimate import estimate_posterior
    from bayeskd.priors.estimate import estimate_prior

    full = train_records(run, cfg)
    total = count_records(full)
    sub_cfg = replace(cfg, methods=tuple(m for m in cfg.methods if m in CURVE_STUDENT_METHODS), curve_epochs=(),
                      curve_students=())
    out = []
    for frac in cfg.curve_students:
        n = max(1, int(round(frac * total)))
        point = next((r for r in curve[1:] if r.get("samples") == n), {})
        settings = point.get("n-gram combination") or combo
        d = point_dir(run, cfg, n)
        proxy, _ = point_proxy(paths, run, cfg, n, pipeline_proxy, align)
        stamp = d / "proxy.json"  # targets and students made with another proxy (an older run's): redone
        if not stamp.exists() or json.loads(stamp.read_text()).get("proxy") != proxy:
            for made in (POSTERIOR_DIR, TEXT_DIR, "students"):
                shutil.rmtree(d / made, ignore_errors=True)
            atomic_write_json(stamp, {"proxy": proxy})
        data, prior = str(train_records(d, sub_cfg)), str(d / "prior")
        summary = estimate_prior(data, paths["tokenizer"], out=prior, order=cfg.order, top_k=cfg.top_k,
                                 write_topk=True, codec="raw")
        kw = dict(top_k=cfg.top_k, batch_size=16, codec="raw", calibrate=False, **settings)
        estimate_posterior(data, prior, proxy, str(d / POSTERIOR_DIR), **kw)
        if cfg.top_logprobs:
            estimate_posterior(data, prior, proxy, str(d / TEXT_DIR), no_evidence=True, **kw)
        log(f"[lab] curve students at {n} records ({summary.get('tokens')} tokens) ...")
        section, _ = students(paths, d, sub_cfg, tok, progress, log)
        s = section["summary"]
        gap = None
        if all(m in s for m in ("sft", "posterior-kd-text", "white-box")):
            sft, text, wb = (s[m]["kl_tf"]["mean"] for m in ("sft", "posterior-kd-text", "white-box"))
            gap = (sft - text) / (sft - wb) if sft > wb else None
        out.append({"fraction": frac, "samples": n, "tokens": summary.get("tokens"),
                    "combination": {k: v for k, v in settings.items() if k != "theta"},
                    "summary": {m: v for m, v in s.items() if m != "student init"}, "gap_closed_text": gap})
    return out


if __name__ == "__main__":  # python -m bayeskd.lab.scale JOB KWARGS_JSON: one measurement, its JSON on stdout
    result = _child(sys.argv[1], json.loads(sys.argv[2]))
    print(json.dumps(result))
