"""The lab's report: the targets it checks (gap closed, posterior against its parts) and the markdown tables."""
from __future__ import annotations

from typing import Any

import numpy as np

from bayeskd.evaluation.evaluate import format_estimation


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The lab's targets, computed from the report (reported whatever they say)."""
    out: dict[str, Any] = {}
    t = report.get("estimation", {}).get("table", {})
    proxy = t.get("proxy alone (before alignment)", {}).get("kl")
    onehot = t.get("smoothed one-hot (eps=0.1)", {}).get("kl")
    # the pipeline's posterior (with the aligned proxy when the lab aligned one), text only and, where the teacher
    # revealed its top-k, conditioned on it: each target says which it measures
    for key, evidence in (("text_only", "text only (shards)"), ("conditioned", "conditioned on the top-")):
        post = next((v["kl"] for k, v in t.items() if k.startswith("posterior,") and evidence in k), None)
        if post is not None and proxy and onehot:
            out[f"posterior_{key}_kl_over_proxy"] = post / proxy
            out[f"posterior_{key}_kl_over_one_hot"] = post / onehot
            out[f"posterior_{key}_le_50pct_proxy"] = bool(post <= 0.5 * proxy)
            out[f"posterior_{key}_le_30pct_one_hot"] = bool(post <= 0.3 * onehot)
    ev = (report.get("estimation", {}).get("evidence") or {}).get("rows", [])
    for r in ev:  # target: conditioned / text-only <= 0.55 at k=5, <= 0.35 at k=20, below the baseline at every k
        out[f"evidence_k{r['k']}_condition_over_text"] = r["condition_ratio"]
        out[f"evidence_k{r['k']}_condition_below_baseline"] = bool(r["condition"] < r["evidence_only"])
        limit = {5: 0.55, 20: 0.35}.get(r["k"])
        if limit is not None:
            out[f"evidence_k{r['k']}_condition_le_{limit}"] = bool(r["condition_ratio"] <= limit)
    o = report.get("estimation", {}).get("observed_tokens")
    if o:  # target: the observed tokens are the teacher's samples (within 0.02 nats, or the noise)
        for k in ("first", "rest"):
            out[f"observed_{k}_gap_within_0.02"] = bool(abs(o[k]["gap"]) <= max(0.02, 2 * o[k]["stderr"]))
        if "eos" in o:
            out["observed_eos_within_2se"] = bool(abs(o["eos"]["expected"] - o["eos"]["observed"])
                                                  <= 2 * o["eos"]["stderr"] + 1)
    c = (report.get("cross_tokenizer") or {}).get("nll_per_byte", {})
    if "posterior-kd-text" in c:  # target: across tokenizers the evidence still helps, at every k
        for m in ("posterior-kd-k5", "posterior-kd"):
            if m in c:
                out[f"cross_{m}_below_text_only"] = bool(c[m]["mean"] < c["posterior-kd-text"]["mean"])
    b = (report.get("bayes") or {}).get("where", {})
    sharp = bool((report.get("teacher") or {}).get("sharpen"))
    for place, key in (("training positions", "train"), ("held-out teacher text", "heldout")):
        if place in b:  # target: the posterior beats its best component (0.92x; sharp teacher 0.8x)
            limit = 0.8 if sharp else 0.92
            out[f"bayes_{key}_posterior_over_best_component"] = b[place]["ratio"]
            out[f"bayes_{key}_ratio_le_{limit}"] = bool(b[place]["ratio"] <= limit)
    s = report.get("students", {}).get("summary", {})
    if "posterior-kd-text" in s and not sharp:  # target, tiny teacher: text-only posterior-KD at most 0.86
        out["posterior_kd_text_kl_tf_le_0.86"] = bool(s["posterior-kd-text"]["kl_tf"]["mean"] <= 0.86)
    if all(m in s for m in ("sft", "posterior-kd", "white-box")):
        sft, post_s, wb = (s[m]["kl_tf"]["mean"] for m in ("sft", "posterior-kd", "white-box"))
        gap = sft - wb
        out["gap_closed_posterior_kd"] = (sft - post_s) / gap if gap > 0 else None
        out["gap_closed_ge_60pct"] = bool(gap > 0 and (sft - post_s) / gap >= 0.6)
        for method in ("posterior-kd-k5", "posterior-kd-text", "bucket-kd"):
            if method in s and gap > 0:
                out[f"gap_closed_{method}"] = (sft - s[method]["kl_tf"]["mean"]) / gap
        if "posterior-kd-k5" in s and gap > 0:  # target: >= 80% of the gap at k = 5, >= 90% at k = 20
            out["gap_closed_k5_ge_80pct"] = bool(out["gap_closed_posterior-kd-k5"] >= 0.8)
            out["gap_closed_k20_ge_90pct"] = bool(out["gap_closed_posterior_kd"] >= 0.9)
    gains = ((report.get("students") or {}).get("onpolicy") or {}).get("gains") or {}
    for method, g in gains.items():  # the on-policy headline: kl_own lowered against more off-policy training
        for key in ("vs_offpolicy_equal_steps", "vs_offpolicy_equal_time", "vs_offpolicy_whitebox_equal_steps",
                    "vs_offpolicy_whitebox_equal_time"):
            if key in g and (method.startswith("onpolicy-") or "whitebox" in key):
                out[f"{method}_kl_own_gain_{key}"] = float(np.mean(g[key]))
                out[f"{method}_lowers_kl_own_{key}_every_seed"] = bool(min(g[key]) > 0)
    from bayeskd.lab.scale import scale_targets

    out.update(scale_targets(report))  # (a run with the scale columns of the corpus curve)
    curves = (report.get("students") or {}).get("curves") or {}
    cell = {(r["method"], r["steps"]): r["kl_tf"]["mean"] for r in curves.get("summary", [])}
    for step in sorted({s_ for _, s_ in cell}):  # the gap closed at every budget of the learning curves
        if all((m, step) in cell for m in ("sft", "posterior-kd", "white-box")):
            gap = cell[("sft", step)] - cell[("white-box", step)]
            for method in ("posterior-kd", "posterior-kd-text"):
                if (method, step) in cell and gap > 0:
                    out[f"curve_gap_closed_{method}_{step}_steps"] = (cell[("sft", step)] - cell[(method, step)]) / gap
    return out


def _trl_sft_note(s: dict[str, Any]) -> list[str]:
    """TRL's SFT rows beside bayeskd's: what each trained on and at what speed."""
    rows = [m for m in ("sft", "trl-sft", "trl-sft-text") if m in s and "trained_tokens" in s[m]]
    if not rows:
        return []
    cells = "; ".join(f"{m}: {s[m]['trained_tokens']['mean']:.0f} response tokens, "
                      f"{s[m]['seconds_per_1k_tokens']['mean']:.2f} s per 1k" for m in rows)
    return [f"TRL's SFTTrainer (trl-sft: on bayeskd's tokens with completion_only_loss; trl-sft-text: TRL's own "
            f"tokenization of prompt + completion, which appends EOS to every completion, also to the samples the "
            f"length limit cut, and may split the teacher's text otherwise). Trained per student: {cells}.", ""]


def method_evidence(method: str, top_logprobs: int) -> str:
    """What a lab student learned from: the teacher's text only, its revealed top-k, or its logits."""
    if method == "white-box":
        return "the teacher's logits"
    if method == "student init":
        return "none"
    k = {"posterior-kd": top_logprobs, "posterior-kd-k5": min(5, top_logprobs), "bucket-kd": top_logprobs}.get(method)
    return f"text + top-{k}" if k else "text only"


def format_teacher(t: dict[str, Any]) -> str:
    """The teacher's mean entropy (nats/token) under the truth the evaluation uses, and how it was sharpened."""
    e, n = t["entropy"], t["positions"]
    line = (f"Teacher: mean entropy {e['estimation']:.3f} nats/token at the {n['estimation']} estimation positions, "
            f"{e['heldout']:.3f} at the {n['heldout']} held-out positions")
    s = t.get("sharpen")
    if not s:
        return line + " (the lab teacher as trained, temperature 1)."
    return line + (f" (sharpened: the base teacher at temperature τ = {s['tau']:.4f}, its logits / τ; τ was chosen "
                   f"for a mean entropy ≤ {s['target']} on {s['positions']} positions of {s['docs']} of its training "
                   f"documents: {s['entropy_before']:.3f} → {s['entropy']:.3f} nats/token).")


def format_report(report: dict[str, Any]) -> str:
    """The report's tables as markdown."""
    lines = [f"# bayeskd lab report — preset `{report['preset']}`", ""]
    d = report.get("data", {})
    lines += [f"Teacher corpus: {d.get('train_records')} black-box samples ({d.get('train_tokens')} response "
              f"tokens) of {d.get('train_prompts_distinct')} distinct prompts; held-out: {d.get('heldout_records')} "
              f"samples of {d.get('heldout_prompts_distinct')} distinct prompts, {d.get('prompts_shared')} of them "
              f"also training prompts. K = {report['config']['top_k']}, prior order {report['config']['order']}.", ""]
    if report.get("teacher"):
        lines += [format_teacher(report["teacher"]), ""]
    if report.get("bayes"):
        from bayeskd.lab.bayes import format_bayes

        lines += ["## Does the Bayesian part pay?", "", format_bayes(report["bayes"]), ""]
    if "estimation" in report:
        e = report["estimation"]
        lines += [f"## Estimation quality ({e['positions']} training positions, lower KL is better)", "",
                  format_estimation(e["table"]), ""]
        if e.get("k_curve"):
            lines += ["KL(teacher‖estimate) against K (the pipeline's proxy and calibrated combination):", "",
                      "| K | prior | proxy | posterior |", "|---:|---:|---:|---:|"]
            lines += [f"| {r['k']} | {r['prior']:.4f} | {r['proxy']:.4f} | {r['posterior']:.4f} |"
                      for r in e["k_curve"]]
            lines.append("")
        o = e.get("observed_tokens")
        if o:
            lines += ["Are the observed tokens the teacher's own samples? Mean −log p(y) − H(p) under the true teacher "
                      "(0 when y ~ p), and the expected number of EOS against the observed one:", "",
                      f"- first response token: {o['first']['gap']:+.4f} ± {o['first']['stderr']:.4f} nats "
                      f"({o['first']['rows']} rows); other positions: {o['rest']['gap']:+.4f} ± "
                      f"{o['rest']['stderr']:.4f} ({o['rest']['rows']} rows)"]
            if "eos" in o:
                lines.append(f"- EOS: expected {o['eos']['expected']:.1f} ± {o['eos']['stderr']:.1f}, observed "
                             f"{o['eos']['observed']}")
            lines.append("")
        ev = e.get("evidence")
        if ev:
            rep_ = ev["report"]
            lines += [f"KL(teacher‖estimate) when the teacher reveals its top-k log-probabilities ("
                      f"{rep_.get('share_with_evidence', 0):.0%} of the positions have evidence):", "",
                      "| k | text only | conditioned | ratio | top-k + uniform tail (TRL, DistillKit) | ratio |",
                      "|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['k']} | {r['text_only']:.4f} | {r['condition']:.4f} | {r['condition_ratio']:.3f} | "
                      f"{r['evidence_only']:.4f} | {r['evidence_only_ratio']:.3f} |" for r in ev["rows"]]
            lines.append("")
    if report.get("corpus_curve"):
        own = any("proxy_records" in r for r in report["corpus_curve"][1:])  # (scale curve: each point's proxy)
        which = "each point's proxy and the pipeline's" if own else "the pipeline's proxy and"
        lines += [f"KL(teacher‖estimate) on held-out teacher text against the corpus size ({which} calibrated "
                  "combination):", "",
                  "| teacher samples | tokens | prior | posterior | proxy |", "|---:|---:|---:|---:|---:|"]
        for r in report["corpus_curve"][1:]:
            lines.append(f"| {r['samples']} | {r['tokens']} | {r['prior']:.4f} | {r['posterior']:.4f} | "
                         f"{r['proxy']:.4f} |")
        lines.append("")
        from bayeskd.lab.scale import format_scale

        lines += format_scale(report)
    if "students" in report:
        s = report["students"]["summary"]
        metrics = [m for m in ("nll", "kl_tf", "kl_own") if any(m in v for v in s.values())]
        k = report["config"].get("top_logprobs") or 0
        st = report["students"]
        if st.get("recipe"):
            from bayeskd.lab.recipe import format_recipe

            lines += format_recipe(st["recipe"], st.get("validation_records", 0))
        b = st.get("budget") or {}
        cfg = report["config"]
        budget = (f"{b.get('epochs'):g} epochs, {b.get('steps')} steps, {b.get('train_tokens')} trained tokens"
                  if b.get("steps") else f"{cfg.get('epochs')} epochs")
        lines += [f"## Student quality ({st.get('heldout_records')} held-out test records; budget {budget}, "
                  f"CE weight {cfg.get('ce_weight'):g}, white-box K {cfg.get('whitebox_top_k') or 'all'}; mean ± std "
                  "over seeds)", "",
                  "| student | teacher evidence | seeds | " + " | ".join(metrics) + " |",
                  "|---|---|---:|" + "---:|" * len(metrics)]
        for method, v in s.items():
            cells = [f"{v[m]['mean']:.4f} ± {v[m]['std']:.4f}" if m in v else "–" for m in metrics]
            lines.append(f"| {method} | {method_evidence(method, k)} | {v[metrics[0]]['n']} | " + " | ".join(cells)
                         + " |")
        lines.append("")
        if any(m in s for m in ("trl-sft", "trl-sft-text")):
            lines += _trl_sft_note(s)
        if st.get("curves"):
            from bayeskd.lab.recipe import format_curves

            lines += format_curves(st["curves"])
        if st.get("onpolicy"):
            from bayeskd.lab.onpolicy import format_onpolicy

            lines += format_onpolicy(st["onpolicy"])
    c = report.get("cross_tokenizer")
    if c:
        share = ", ".join(f"{m}: {v['share_with_evidence']:.0%}" for m, v in c["evidence"].items())
        top = c["evidence"].get("posterior-kd", {})
        if "cross_entries_dropped" in top:  # how often a teacher string bounds no one student token
            share += (f"; at the top-{report['config']['top_logprobs']}, {top['cross_entries_dropped']} of "
                      f"{top['cross_entries']} revealed entries were a strict prefix of the student's token there "
                      f"(dropped, in {top['cross_rows_dropped_in']} of {top['rows']} rows) and "
                      f"{top['cross_rows_cap_lifted']} rows whose student token was unlisted got no cap")
        lines += [f"## Across tokenizers (teacher B: vocabulary {c['teacher_vocab']}, student {c['student_vocab']})", "",
                  f"{c['train_records']} samples of B with its top-{report['config']['top_logprobs']} log-probabilities; "
                  f"positions with evidence ({share}). Students' NLL per byte of {c['heldout_records']} held-out B "
                  "samples (differences are differences of KL(B‖student) per byte; mean ± std over seeds):", "",
                  "| student | seeds | NLL / byte |", "|---|---:|---:|"]
        if (report.get("teacher") or {}).get("sharpen"):  # after the paragraph above the table
            lines.insert(-3, "Teacher B is not sharpened: it is the base lab's teacher B, at temperature 1.")
        lines += [f"| {m} | {v['n']} | {v['mean']:.4f} ± {v['std']:.4f} |" for m, v in c["nll_per_byte"].items()]
        lines.append("")
    if report.get("targets"):
        lines += ["## Targets", ""] + [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
                                       for k, v in report["targets"].items()]
    return "\n".join(lines) + "\n"
