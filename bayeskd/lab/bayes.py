"""Does the Bayesian part earn its place? The lab's table of the posterior against its own components.

For the n-gram prior and the suffix prior (`bayeskd.priors.suffix`), each combined with the pipeline's proxy by the
best fixed combination and by the adaptive mixture (`bayeskd.core.adaptive`): KL(teacher‖estimate) at the
scored training positions and on held-out teacher text, beside each component alone, and the ratio of the posterior
the pipeline would choose (the lowest teacher-token NLL on the calibration records, not the truth) to the best
single component (picked by the truth: the hardest comparison). Honest by construction: the priors are queried
leave-one-out on their own corpus (and plainly on held-out text, which they never counted); the aligned proxy never
trained on the scored or the calibration records (`align_proxy(holdout_records=...)`, checked here); the
combination, the adaptive weights and the suffix prior's beta are chosen on the calibration records only, never on
scored ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _kl(t_lp: torch.Tensor, est, valid: torch.Tensor) -> float:
    from bayeskd.evaluation.metrics import kl_teacher_to_estimate

    return float(kl_teacher_to_estimate(t_lp, est)[valid].mean())


def _check_heldout(proxy_dir: str, records: list[dict], needed: list[int]) -> str:
    """The records the lab scores the proxy on must be ones it never trained on."""
    from bayeskd.records import records_fingerprint
    from bayeskd.posterior.calibrate import expand_ranges, read_training_info

    info = read_training_info(proxy_dir)
    if info is None:
        return "base proxy (not trained on the teacher's text)"
    if info.get("records_fingerprint") != records_fingerprint(records):
        raise RuntimeError(f"{proxy_dir} was aligned on other records than the lab's teacher corpus")
    missing = sorted(set(needed) - set(expand_ranges(info.get("heldout", []))))
    if missing:
        raise RuntimeError(f"{proxy_dir} was trained on {len(missing)} of the records the lab scores it on "
                           f"(e.g. record {missing[0]}): the comparison would favour the proxy")
    return f"aligned proxy, held out {len(needed)} scored + calibration records"


def bayes_table(paths: dict[str, str], run: Path, cfg, tok, train, pipeline_proxy: str,
                log: Callable[[str], None] = print, ngram_calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The table (see the module docstring) for the lab run in `run` (`train`: its training records, tokenized).
    `ngram_calibration`: the run's calibration of the n-gram prior with this proxy (its "table" and "records"
    range), reused when it scored the same records."""
    from transformers import AutoModelForCausalLM

    from bayeskd.data import iter_teacher_records, load_teacher_records, tokenize_records
    from bayeskd.evaluation.evaluate import response_logprobs
    from bayeskd.lab.records import train_records
    from bayeskd.posterior.calibrate import calibrate_combination
    from bayeskd.core.combine import combine
    from bayeskd.core.names import MATCH_LENGTH
    from bayeskd.posterior.proxy import ProxyPosterior
    from bayeskd.priors.ngram import NGramPrior
    from bayeskd.priors.suffix import SuffixPrior

    held = tokenize_records(load_teacher_records(str(run / "teacher_heldout.jsonl"))[0], tok)
    V, K = train.vocab_size, cfg.top_k
    n_eval = min(cfg.eval_records, len(train))
    ev = list(range(n_eval))
    cal = list(range(n_eval, min(n_eval + cfg.calibration_records, len(train))))
    # what identifies each record (its prompt and response, or messages), streamed: not their log-probabilities
    records = [{k: r[k] for k in ("prompt", "response", "messages") if k in r}
               for r in iter_teacher_records(str(train_records(run, cfg)))[0]]
    proxy_note = _check_heldout(pipeline_proxy, records, ev + cal)
    resp, prm = train.response_sequences(), train.prompt_sequences()
    ngram = NGramPrior.load(run / "prior" / "prior")
    suffix = SuffixPrior(order=ngram.order, vocab_size=V).fit(resp, prm)
    beta, beta_table = suffix.choose_beta([resp[i] for i in cal], [prm[i] for i in cal], k=K)
    proxy = ProxyPosterior(pipeline_proxy, top_k=K)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    y_cal = torch.from_numpy(np.concatenate([resp[i] for i in cal]).astype(np.int64))
    q_cal = proxy.proxy_topk(train, cal, V)
    where = {"training positions": (train, ev, True), "held-out teacher text": (held, list(range(len(held))), False)}
    truth = {name: response_logprobs(teacher, t, idx) for name, (t, idx, _) in where.items()}
    q_rows = {name: proxy.proxy_topk(t, idx, V) for name, (t, idx, _) in where.items()}
    priors = {"n-gram": ngram, "suffix": suffix}
    settings = {}  # per prior: the best fixed combination and the adaptive one, chosen on the calibration records
    for pname, prior in priors.items():
        if pname == "n-gram" and ngram_calibration and ngram_calibration.get("records") == [cal[0], cal[-1] + 1]:
            table = ngram_calibration["table"]  # the run's own calibration: the same records, prior and proxy
        else:
            p_cal = prior.topk([resp[i] for i in cal], K, leave_one_out=True, contexts=[prm[i] for i in cal])
            _, table = calibrate_combination(p_cal, q_cal, y_cal, top_k=K)
        for label in ("fixed", "adaptive"):
            r = next(r for r in table if (r["mode"] == "adaptive") == (label == "adaptive"))
            kw = {k: v for k, v in r.items() if k != "nll"}
            settings[f"{pname} prior x proxy, {label} ({_describe(kw)})"] = (pname, kw, r["nll"])
    # the pipeline's choice among them: the lowest teacher-token NLL on the calibration records (not the truth)
    chosen = min(settings, key=lambda k: settings[k][2])
    out: dict[str, Any] = {"proxy": proxy_note, "suffix_beta": beta, "suffix_beta_table": beta_table,
                           "calibration_records": len(cal), "chosen": chosen,
                           "calibration_nll": {k: v[2] for k, v in settings.items()}, "where": {}}
    for name, (t, idx, loo) in where.items():
        t_lp, valid = truth[name]
        seqs = [t.response_sequences()[i] for i in idx]
        ctxs = [t.prompt_sequences()[i] for i in idx]
        rows = {"proxy": _kl(t_lp, q_rows[name], valid)}
        p_rows = {pname: prior.topk(seqs, K, leave_one_out=loo, contexts=ctxs) for pname, prior in priors.items()}
        for pname, r in p_rows.items():
            rows[f"{pname} prior"] = _kl(t_lp, r, valid)
        ml = p_rows["suffix"].extras[MATCH_LENGTH][valid]
        rows["(share of positions whose context matches > order-1 tokens elsewhere)"] = float(
            (ml >= suffix.order).float().mean())
        posts = {label: _kl(t_lp, combine(p_rows[pname], q_rows[name], top_k=K, **kw), valid)
                 for label, (pname, kw, _) in settings.items()}
        rows.update(posts)
        best_component = min(rows["proxy"], rows["n-gram prior"], rows["suffix prior"])
        post = posts[chosen]
        out["where"][name] = {"positions": int(valid.sum()), "kl": rows, "best_component": best_component,
                              "posterior": post, "ratio": post / best_component}
        log(f"[lab] Bayesian part, {name}: posterior ({chosen}) {post:.4f} / best component {best_component:.4f} "
            f"= {post / best_component:.3f}")
    out["budget"] = _budget(records, train, held, truth["held-out teacher text"], q_rows["held-out teacher text"],
                            settings, ngram.order, K, beta)
    log(f"[lab] equal budget: {out['budget']}")
    return out


def _budget(records, train, held, truth, q_held, settings, order: int, K: int, beta: tuple[float, ...]) -> list[dict[str, Any]]:
    """More prompts or more samples per prompt, at an equal number of samples: priors counted on one sample of
    every prompt against all samples of half the prompts, scored on held-out teacher text (alone and with the
    proxy, in the combinations chosen above)."""
    from bayeskd.core.combine import combine
    from bayeskd.priors.ngram import NGramPrior
    from bayeskd.priors.suffix import SuffixPrior

    t_lp, valid = truth
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_prompt.setdefault(str(r.get("prompt", r.get("messages"))), []).append(i)
    groups = list(by_prompt.values())
    per = max(len(g) for g in groups)
    if per < 2:
        return []
    subsets = {"every prompt, 1 sample": [g[0] for g in groups],
               f"1/{per} of the prompts, {per} samples": [i for g in groups[::per] for i in g]}
    resp, prm = train.response_sequences(), train.prompt_sequences()
    seqs, ctxs = held.response_sequences(), held.prompt_sequences()
    rows = []
    for name, idx in subsets.items():
        r_s, p_s = [resp[i] for i in idx], [prm[i] for i in idx]
        priors = {"n-gram": NGramPrior(order=order, vocab_size=train.vocab_size).fit(r_s),
                  "suffix": SuffixPrior(order=order, vocab_size=train.vocab_size, beta=beta).fit(r_s, p_s)}
        row: dict[str, Any] = {"subset": name, "samples": len(idx), "tokens": int(sum(len(x) for x in r_s))}
        p_rows = {k: p.topk(seqs, K, contexts=ctxs) for k, p in priors.items()}
        for k, p in p_rows.items():
            row[f"{k} prior"] = _kl(t_lp, p, valid)
        for label, (pname, kw, _) in settings.items():
            row[label] = _kl(t_lp, combine(p_rows[pname], q_held, top_k=K, **kw), valid)
        rows.append(row)
    return rows


def _describe(kw: dict[str, Any]) -> str:
    if kw["mode"] == "adaptive":
        return "adaptive mixture"
    return kw["mode"] + " " + ", ".join(f"{k}={v:g}" for k, v in kw.items() if k != "mode")


def format_bayes(b: dict[str, Any]) -> str:
    """Markdown: one column per place scored, a row per estimate, then the ratio."""
    names = list(b["where"])
    keys = list(b["where"][names[0]]["kl"])
    betas = "/".join(f"{x:g}" for x in np.atleast_1d(b["suffix_beta"]))  # one per context-length bucket
    lines = [f"KL(teacher‖estimate), text only; proxy: {b['proxy']}; combinations chosen on "
             f"{b['calibration_records']} calibration records; suffix prior beta by context length = {betas} "
             f"(chosen the same way):", "", "| estimate | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{b['where'][n]['kl'][k]:.4f}" for n in names) + " |")
    lines.append(f"| **chosen posterior ({b['chosen']}) / best component** | " + " | ".join(
        f"**{b['where'][n]['ratio']:.3f}**" for n in names) + " |")
    if b.get("budget"):
        cols = [k for k in b["budget"][0] if k not in ("subset", "samples", "tokens")]
        lines += ["", "More prompts or more samples per prompt, at an equal number of teacher samples (KL on held-out "
                  "teacher text; combinations as above):", "",
                  "| priors counted on | samples | tokens | " + " | ".join(cols) + " |",
                  "|---|---:|---:|" + "---:|" * len(cols)]
        for r in b["budget"]:
            lines.append(f"| {r['subset']} | {r['samples']} | {r['tokens']} | "
                         + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)
