"""The main job: `bayeskd lab run` — the whole black-box pipeline on the lab, scored against the truth.

    build or reuse the lab (teacher, proxy, student init; `bayeskd.lab.build`)
    → sample the teacher through its text only (train prompts, held-out prompts) as JSONL (with `records_format`
      "parquet" the training records also as Parquet, which every stage then reads)
    → estimate-prior → estimate-posterior → distill (the same library functions as the CLI commands)
    → evaluate: estimation quality at the training positions, curves against corpus size and K,
      student quality on held-out teacher text, per distillation method and seed: the KD recipe (CE weight,
      white-box K) chosen on the validation half of the held-out prompts, every student scored on the test half,
      learning curves of the main methods (`bayeskd.lab.students`).

Everything lands under `root/<preset>/run/`; `report.json` and `report.md` hold the tables. Every stage is skipped
when its output exists (rerun = resume); a run directory made with other settings is refused unless `force`.
"""
from __future__ import annotations

import json
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bayeskd.evaluation.evaluate import (estimation_table, format_estimation, one_hot_estimate, read_target_rows,
                                         response_logprobs)
from bayeskd.evaluation.metrics import kl_teacher_to_estimate, observed_token_check
from bayeskd.lab.build import LabError, build_lab, get_preset, load_lab_prompts, read_manifest, split_corpus
from bayeskd.lab.report import check_targets, format_report
from bayeskd.lab.http_sampling import sample_teacher
from bayeskd.lab.records import count_records, head_teacher_records, to_parquet, train_records
from bayeskd.lab.onpolicy import ONPOLICY_METHODS
from bayeskd.lab.students import ALL_METHODS, BUCKET_DIR, K5_DIR, METHODS, POSTERIOR_DIR, TEXT_DIR, students
from bayeskd.lab.teacher import mean_entropy
from bayeskd.resume import check_stamp, read_stamp, settings_diff
from bayeskd.integrity import atomic_write_bytes, atomic_write_json
from bayeskd.job_config import setting

IN_SAMPLE_PRIOR = "n-gram prior, in-sample (no leave-one-out: scored on its own counts)"
POSTERIOR_VARIANTS = {  # name -> combine() settings, evaluated in memory beside the shards' log-linear one
    "posterior dirichlet (c=1), text only": dict(mode="dirichlet", c=1.0),
    "posterior mixture (w=0.5), text only": dict(mode="mixture", w=0.5),
    "posterior log-linear + the observed token, text only": dict(mode="log_linear", evidence=1.0),
}


@dataclass(frozen=True)
class LabRunConfig:
    """The settings of one lab run (besides the lab preset itself), the `lab run` job's one config: every field is a
    `bayeskd lab run` option; one not given takes the preset's value (`RUN_CONFIGS`; these defaults are tiny's)."""

    samples_per_prompt: int = setting(2, "Teacher samples per training prompt (the black-box corpus).", min=1)
    max_prompts: int | None = setting(None, "Training prompts used (default: all the corpus offers).", min=1)
    max_new_tokens: int = setting(48, "Longest teacher (and proxy, student) sample, in tokens.", min=1)
    temperature: float = setting(1.0, "The teacher's sampling temperature.", min=0, min_open=True)
    top_logprobs: int = setting(20, "Log-probabilities the teacher server reveals per token (0: text only).", min=0)
    keep_empty: bool = setting(True, "Keep the teacher's blank answers: every sample counts, or the estimates are "
                               "biased.")
    cross_tokenizer: bool = setting(True, "Also teacher B, with another tokenizer (bayeskd.lab.cross; needs "
                                    "--top-logprobs).")
    evidence_ks: tuple[int, ...] = setting((1, 5, 20), "The estimation table scores evidence cut to these k "
                                           "(repeatable).", min=1)
    order: int = setting(4, "The n-gram prior's order.", min=1, max=8)
    top_k: int = setting(64, "K of the prior and posterior targets.", min=1)
    eval_records: int = setting(400, "Training records scored for estimation quality.", min=1)
    calibration_records: int = setting(200, "Training records (after those) that choose the combination settings.",
                                       min=1)
    corpus_fractions: tuple[float, ...] = setting((0.125, 0.25, 0.5, 1.0), "Shares of the corpus the estimation "
                                                  "curve is measured at (repeatable).", min=0, min_open=True, max=1)
    k_values: tuple[int, ...] = setting((4, 16, 64), "Target K values the estimation curve is measured at "
                                        "(repeatable).", min=1)
    methods: tuple[str, ...] = setting(METHODS, "Distillation methods (repeatable, or comma-separated): the "
                                       "students, TRL's SFT peers (trl-sft, trl-sft-text) and the on-policy study's "
                                       "rows (offpolicy-more, onpolicy-*, trl-gkd*).",
                                       metavar="METHOD[,METHOD...]")
    seeds: int = setting(1, "Students per method.", min=1)
    epochs: float = setting(2.0, "Epochs of each student.", min=0, min_open=True)
    batch_size: int = setting(16, "Students' batch size (and the proxy alignment's).", min=1)
    lr: float = setting(3e-3, "Students' learning rate.")
    kd_weight: float = setting(1.0, "Weight of the KD term.", min=0)
    ce_weight: float | None = setting(None, "CE beside KD (SFT: 1). Default: chosen from --ce-weights on validation "
                                      "prompts.", min=0)
    ce_weights: tuple[float, ...] = setting((0.0, 0.1, 1.0), "CE weights the KD recipe chooses from (repeatable).",
                                            min=0)
    whitebox_top_k: int | None = setting(None, "The white-box teacher's K (0: all). Default: chosen from "
                                         "--whitebox-ks.", min=0)
    whitebox_ks: tuple[int, ...] = setting((64, 0), "White-box K values the recipe chooses from (repeatable).",
                                           min=0)
    curve_epochs: tuple[float, ...] = setting((1.0, 2.0, 4.0, 8.0), "Learning curves: the epochs checkpointed in "
                                              "one longer run (repeatable).", min=0, min_open=True)
    curve_seeds: int = setting(2, "Learning curves: runs per method.", min=1)
    align: bool = setting(True, "Align the proxy to the teacher's samples (Proxy-KD stage 1 + 2).")
    align_sft_epochs: float = setting(1.0, "Alignment: SFT epochs.", min=0)
    align_rounds: int = setting(1, "Alignment: preference rounds.", min=0)
    align_lr: float = setting(1e-3, "Alignment: SFT learning rate (tiny models learn fast).")
    dpo_lr: float = setting(1e-4, "Alignment: DPO learning rate.")
    gad_d_warmup: int = setting(10, "GAD: discriminator-only steps before the adversarial ones.", min=0)
    gad_steps: int = setting(60, "GAD: adversarial (GRPO) steps, starting from the seed's SFT student.", min=0)
    gad_temperature: float = setting(1.0, "GAD: the student's sampling temperature: the teacher's (0.8 made GAD "
                                     "worse: experiments/gad_tune.py).", min=0, min_open=True)
    gad_sft_coef: float = setting(1.0, "GAD: teacher cross-entropy in each GRPO step (0: the paper's GAD).", min=0)
    gad_group: int = setting(8, "GAD: student samples per prompt.", min=2)
    gad_batch_prompts: int = setting(8, "GAD: prompts per step.", min=1)
    gad_lr: float = setting(1e-4, "GAD: the student's and the discriminator's learning rate.")
    onpolicy_warm_epochs: float = setting(8.0, "On-policy study: epochs of the posterior-KD run whose validation-best "
                                          "epoch checkpoint is the warm start.", min=0, min_open=True)
    onpolicy_epochs: float = setting(1.0, "On-policy study: epochs of every continuation from the warm start.",
                                     min=0, min_open=True)
    onpolicy_offpolicy_epochs: float = setting(1.0, "On-policy study: epochs of the off-policy continuations (the "
                                               "equal-steps rows; for equal seconds they run longer).", min=0,
                                               min_open=True)
    onpolicy_equal_time_max_epochs: int = setting(40, "On-policy study: the most epochs an off-policy continuation "
                                                  "runs to match an on-policy row's seconds (0: no equal-seconds "
                                                  "comparison).", min=0)
    onpolicy_lr: float = setting(1e-3, "On-policy study: the continuations' constant learning rate.", min=0,
                                 min_open=True)
    onpolicy_fraction: float = setting(1.0, "On-policy study: λ, the share of each batch sampled by the student "
                                       "(TRL's GKD: the probability of an on-policy step).", min=0, max=1)
    onpolicy_temperature: float = setting(1.0, "On-policy study: the student's sampling temperature.", min=0,
                                          min_open=True)
    onpolicy_own_samples: int = setting(4, "On-policy study: own samples per test prompt that kl_own is pooled "
                                        "over.", min=1)
    prompt_pool: str = setting("documents", "Training prompts: 'documents' (the first sentence of every teacher and "
                               "proxy document) or 'sentences' (every sentence or line opening that a document "
                               "continues, alone and with the sentence before it: ~10x more; none shares text with a "
                               "held-out prompt).", choices=("documents", "sentences"))
    evidence_prompts: int | None = setting(None, "Training prompts whose samples carry the revealed top "
                                           "log-probabilities (the first ones; the others' text only: at 1M tokens "
                                           "every token's JSON log-probabilities would take ~10 GB to load). "
                                           "Default: all.", min=1)
    sample_max_batch: int = setting(1, "Sampling: the teacher server decodes up to this many waiting samples as one "
                                    "batch (serve-teacher --max-batch; 1: one request at a time).", min=1)
    sample_concurrency: int = setting(4, "Sampling: requests in flight (to batch, at least --sample-max-batch).",
                                      min=1)
    student_max_steps: int | None = setting(None, "Students' optimizer steps: a fixed training budget whatever the "
                                            "corpus size (default: --epochs over the corpus).", min=1)
    curve_scale: bool = setting(False, "Corpus curve: also the suffix prior, the n-gram and suffix posteriors "
                                "recalibrated at each point, and the wall time and peak memory of estimate-prior and "
                                "estimate-posterior on that many records (each in a fresh process).")
    align_records: int | None = setting(None, "Alignment: the records it trains on, the first ones after the scored "
                                        "and calibration records (default: all the others).", min=1)
    curve_students: tuple[float, ...] = setting((), "Students at these shares of the corpus too (repeatable): targets "
                                                "from the prior counted on that share, the methods among sft, "
                                                "posterior-kd-text, posterior-kd, white-box, at the chosen recipe "
                                                "(give --student-max-steps for an equal budget).", min=0,
                                                min_open=True, max=1)
    records_format: str = setting("jsonl", "The training records every stage reads: 'jsonl' (as sampled) or "
                                  "'parquet' (converted once after sampling; the JSONL is kept): at scale the top-k "
                                  "log-probabilities of every sample fit in Parquet (1M tokens with top-20: 103 MB "
                                  "read in ~4 s, against 1.7 GB of JSONL in ~135 s).", choices=("jsonl", "parquet"))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def train_kwargs(self, seed: int, progress: bool, kd: bool = True) -> dict[str, Any]:
        """`distill` keyword arguments of a lab student trained with `seed`; `kd` False: SFT, whose only loss is CE
        (weight 1: the KD recipe's CE weight is not SFT's)."""
        recipe = {k: v for k, v in (("ce_weight", self.ce_weight if kd else 1.0),
                                    ("whitebox_top_k", self.whitebox_top_k)) if v is not None}
        # (None until chosen on validation prompts: distill's defaults)
        budget = {"max_steps": self.student_max_steps} if self.student_max_steps else {}
        return dict(num_train_epochs=self.epochs, per_device_train_batch_size=self.batch_size, learning_rate=self.lr,
                    lr_scheduler_type="cosine", warmup_steps=10, seed=seed, data_seed=seed, logging_steps=10,
                    disable_tqdm=not progress, kd_weight=self.kd_weight, save_strategy="no", **budget, **recipe)


# each lab preset's run settings (a preset without an entry, e.g. tiny-sharp, runs with its base lab's)
RUN_CONFIGS: dict[str, LabRunConfig] = {
    "micro": LabRunConfig(samples_per_prompt=1, max_prompts=48, max_new_tokens=16, order=3, top_k=16,
                          eval_records=16, calibration_records=16, corpus_fractions=(0.5, 1.0), k_values=(4, 16),
                          epochs=1.0, batch_size=8, ce_weights=(0.0, 1.0), whitebox_ks=(0,), curve_epochs=(0.5, 1.0),
                          curve_seeds=1, gad_d_warmup=2, gad_steps=2, gad_group=4, gad_batch_prompts=4,
                          onpolicy_warm_epochs=2.0, onpolicy_offpolicy_epochs=2.0, onpolicy_own_samples=2),
    # tiny: the main command, with the on-policy headline (top-20-scored on-policy against more off-policy KD at
    # equal steps; equal seconds, ~25 more off-policy epochs, would take the command past 12 minutes: the
    # benchmark's). Its recipe grid leaves out CE weight 1 and white-box K 64, which lost on tiny by 0.16 and 0.04
    # nats (3 seeds, benchmarks/results/lab_tiny.md): 5 fewer recipe students (--ce-weights / --whitebox-ks widen it).
    # It samples both teachers through the batching server (32 samples decoded together: ~3x faster; the same
    # tokens as one at a time in 1,200 of 1,202 samples, see README "Reproducibility"; --sample-max-batch 1 for
    # bit-exact samples)
    "tiny": LabRunConfig(methods=(*METHODS, "offpolicy-more", "onpolicy-k20"), onpolicy_equal_time_max_epochs=0,
                         ce_weights=(0.0, 0.1), whitebox_ks=(0,), sample_max_batch=32, sample_concurrency=32),
    "small": LabRunConfig(samples_per_prompt=4, max_new_tokens=64, eval_records=800, seeds=3, epochs=3.0, lr=1e-3),
}
# tiny with GPT-2's tokenizer: tiny's settings without the learning curves and the on-policy study (at V = 50,260 a
# student step costs ~10x tiny's on a CPU, 1.7 s against 0.15: the 8-epoch curve runs alone would take hours)
RUN_CONFIGS["tiny-gpt2"] = replace(RUN_CONFIGS["tiny"], methods=METHODS, curve_epochs=())
# The lab at scale: another run of an existing lab's models (never retrained), in root/<lab>/run-<preset>: >= 1M
# teacher response tokens from the "sentences" prompt pool (~6k prompts), sampled through the batching server, the
# corpus curve from ~42k tokens to all of it with its costs, students at tiny's training budget (152 steps of 16: 2
# epochs of tiny's 1,202 records) on all of it and at two smaller points, only the rows the scale targets read.
# Samples per prompt from the mean response measured on 1,536 samples of 256 pool prompts: 35.2 tokens (tiny), 28.1
# (tiny-sharp: more blank answers). The proxy aligns on 4,000 of the records (~140k tokens: DPO on all would take
# hours on a CPU).
SCALE_PRESETS: dict[str, str] = {"tiny-1m": "tiny", "tiny-sharp-1m": "tiny-sharp"}  # scale preset -> its lab
_SCALE = dict(prompt_pool="sentences", evidence_prompts=200, sample_max_batch=512, sample_concurrency=128,
              cross_tokenizer=False, curve_scale=True, align_records=4000,
              methods=("sft", "posterior-kd-text", "posterior-kd", "white-box"), seeds=2, student_max_steps=152,
              ce_weights=(0.0, 0.1), whitebox_ks=(0,), curve_epochs=())
RUN_CONFIGS.update({  # 6,243 prompts: tiny 5 x 35.2 -> ~1.10M tokens, tiny-sharp 7 x 28.1 -> ~1.23M
    "tiny-1m": LabRunConfig(samples_per_prompt=5, corpus_fractions=(0.038, 0.15, 0.5, 1.0),
                            curve_students=(0.038, 0.15), **_SCALE),
    "tiny-sharp-1m": LabRunConfig(samples_per_prompt=7, corpus_fractions=(0.034, 0.15, 0.5, 1.0),
                                  curve_students=(0.034, 0.15), **_SCALE)})


def resolve_preset(preset) -> tuple[Any, str]:
    """(the lab preset whose models `preset` (a name or a LabPreset) uses, the name of its run directory under the
    lab): "run", or "run-<preset>" for a scale preset (`SCALE_PRESETS`)."""
    if isinstance(preset, str) and preset in SCALE_PRESETS:
        return get_preset(SCALE_PRESETS[preset]), f"run-{preset}"
    return get_preset(preset), "run"


def train_prompts(preset, pool: str = "documents") -> list[str]:
    """The prompts the teacher answers for the black-box corpus (deterministic), from the corpus documents outside
    the held-out prompts: "documents", the first sentence of every one (in corpus order); "sentences", every sentence
    opening that a document continues, alone and with the sentence before it, none sharing text with a held-out
    prompt (`bayeskd.lab.scale.sentence_prompts`), distinct, in an order shuffled with the preset's seed (so a share
    of the corpus is a random share of the prompts)."""
    from bayeskd.corpus import embedded_corpus, split_prompt_response

    teacher_docs, proxy_docs, held = split_corpus(embedded_corpus(), preset.n_prompts, preset.seed)
    if pool == "sentences":
        from bayeskd.lab.scale import sentence_prompts

        prompts = sentence_prompts(teacher_docs + proxy_docs, [r["prompt"] for r in held])
        return [prompts[i] for i in np.random.default_rng(preset.seed).permutation(len(prompts))]
    if pool != "documents":
        raise ValueError(f"unknown prompt pool {pool!r}; choose 'documents' or 'sentences'")
    pairs = (split_prompt_response(d) for d in teacher_docs + proxy_docs)
    return [p[0] for p in pairs if p is not None]


@contextmanager
def _stage(name: str, log: Callable[[str], None], timings: dict[str, float]):
    """Log a stage's start and duration; its seconds go into `timings`. The log also gives the process's peak RSS
    so far, so the stage that raised it can be found from the log alone."""
    log(f"[lab] {name} ...")
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    log(f"[lab] {name}: {timings[name]:.1f} s (peak RSS so far {peak:.2f} GiB)")


def _mean_kl(teacher_lp: torch.Tensor, estimate, valid: torch.Tensor) -> float:
    return float(kl_teacher_to_estimate(teacher_lp, estimate)[valid].mean())


def _calibrate(run: Path, cfg: LabRunConfig, proxy_dir: str, train_tok) -> dict[str, Any]:
    """Pick the combination settings by the likelihood of the teacher's own tokens (`bayeskd.posterior.calibrate`) on
    `calibration_records` training records after the ones the evaluation scores (disjoint from them). `train_tok`:
    the run's training records, tokenized."""
    from bayeskd.posterior.calibrate import calibrate_on_records
    from bayeskd.posterior.proxy import ProxyPosterior
    from bayeskd.priors.ngram import NGramPrior

    lo = min(cfg.eval_records, max(0, len(train_tok) - cfg.calibration_records))
    cal = range(lo, min(lo + cfg.calibration_records, len(train_tok)))
    result = calibrate_on_records(NGramPrior.load(run / "prior" / "prior"),
                                  ProxyPosterior(proxy_dir, top_k=cfg.top_k), train_tok, cal, cfg.top_k)
    return {**result, "records": [cal.start, cal.stop]}


def _estimation(paths, run: Path, cfg: LabRunConfig, tok, tokenized, log, pipeline_proxy: str,
                combo: dict[str, Any]) -> dict[str, Any]:
    """Estimation quality at the first `eval_records` training records (`tokenized`: all of them, tokenized), plus
    the curve against K (the pipeline's proxy and combination)."""
    from transformers import AutoModelForCausalLM

    from bayeskd.core.combine import combine
    from bayeskd.data import tokenize_records
    from bayeskd.posterior.proxy import ProxyPosterior
    from bayeskd.priors.ngram import NGramPrior

    idx = list(range(min(cfg.eval_records, len(tokenized))))
    V = tokenized.vocab_size
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    t_lp, valid = response_logprobs(teacher, tokenized, idx)
    prior = NGramPrior.load(run / "prior" / "prior")
    seqs = [tokenized.response_sequences()[i] for i in idx]
    proxy = ProxyPosterior(paths["proxy"], top_k=cfg.top_k)
    proxy_rows = proxy.proxy_topk(tokenized, idx, V)
    prior_loo = prior.topk(seqs, cfg.top_k, leave_one_out=True)
    tokens = torch.from_numpy(np.concatenate(seqs).astype(np.int64))
    ests = {
        "smoothed one-hot (eps=0.1)": one_hot_estimate(tokenized, idx, V, 0.1),
        IN_SAMPLE_PRIOR: prior.topk(seqs, cfg.top_k, leave_one_out=False),
        "n-gram prior (leave-one-out)": read_target_rows(run / "prior" / "topk", tokenized, idx),
        "proxy alone (before alignment)": proxy_rows,
        "posterior log-linear, text only (shards)": read_target_rows(run / "posterior", tokenized, idx),
    }
    for name, kw in POSTERIOR_VARIANTS.items():
        extra = {"teacher_tokens": tokens} if kw.get("evidence") else {}
        ests[name] = combine(prior_loo, proxy_rows, top_k=cfg.top_k, **kw, **extra)
    pipe = ProxyPosterior(pipeline_proxy, top_k=cfg.top_k)
    if cfg.align:
        ests["proxy after alignment"] = pipe.proxy_topk(tokenized, idx, V)
    ests[pipeline_name(cfg)] = read_target_rows(run / POSTERIOR_DIR, tokenized, idx)
    if cfg.top_logprobs:  # the same pipeline without the revealed log-probabilities: what text alone achieves
        ests[pipeline_name(cfg, text_only=True)] = read_target_rows(run / TEXT_DIR, tokenized, idx)
    table = estimation_table(t_lp, ests, valid)
    observed = observed_token_check(t_lp, seqs, tokenized.eos_token_id, valid)
    k_curve = []
    for k in cfg.k_values:
        k = min(k, V)
        p_k = prior.topk(seqs, k, leave_one_out=True)
        q_k = ProxyPosterior(pipe.model, top_k=k).proxy_topk(tokenized, idx, V)
        row = {"k": k}
        for name, est in (("prior", p_k), ("proxy", q_k), ("posterior", combine(p_k, q_k, top_k=k, **combo))):
            row[name] = _mean_kl(t_lp, est, valid)
        k_curve.append(row)
    log(format_estimation(table))
    evidence = None
    if cfg.top_logprobs:
        text_only = combine(prior_loo, pipe.proxy_topk(tokenized, idx, V), top_k=cfg.top_k, **combo)
        records = head_teacher_records(train_records(run, cfg), len(idx))  # (their log-probabilities: only these)
        evidence = _evidence_curve(records, tokenize_records(records, tok), tok, idx, cfg, t_lp, valid, text_only)
    return {"positions": int(valid.sum()), "records": len(idx), "table": table, "k_curve": k_curve,
            "teacher_entropy": mean_entropy(t_lp, valid), "evidence": evidence, "observed_tokens": observed,
            "tokenize": tokenized.report.to_dict()}


def _evidence_curve(records, tokenized, tok, idx, cfg: LabRunConfig, t_lp, valid, text_only) -> dict[str, Any]:
    """KL(teacher‖estimate) when the teacher reveals its top-k log-probabilities, k in `evidence_ks`: the
    text-only calibrated posterior, conditioned on them, and the baselines' revealed top-k with a uniform tail."""
    from bayeskd.posterior.evidence import evidence_rows
    from bayeskd.core.condition import apply_evidence

    ev, report = evidence_rows(records, tokenized, tok, indices=idx)
    base = _mean_kl(t_lp, text_only, valid)
    rows = []
    for k in cfg.evidence_ks:
        e = ev.top(k)
        cond = _mean_kl(t_lp, apply_evidence(text_only, e, "condition", cfg.top_k), valid)
        only = _mean_kl(t_lp, apply_evidence(text_only, e, "evidence_only", cfg.top_k), valid)
        rows.append({"k": k, "text_only": base, "condition": cond, "evidence_only": only,
                     "condition_ratio": cond / base, "evidence_only_ratio": only / base,
                     "share_with_evidence": float(torch.from_numpy(e.has)[valid].float().mean())})
    return {"report": report, "rows": rows}


def pipeline_name(cfg: LabRunConfig, text_only: bool = False) -> str:
    """The estimation table's name of the pipeline's posterior, saying what evidence it used."""
    evidence = "text only" if text_only or not cfg.top_logprobs else f"conditioned on the top-{cfg.top_logprobs}"
    return f"posterior, {'aligned ' if cfg.align else ''}proxy, calibrated, {evidence} (shards)"


def _corpus_curve(paths, run: Path, cfg: LabRunConfig, tok, train_tok, pipeline_proxy: str,
                  combo: dict[str, Any], align: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """KL(teacher‖estimate) on held-out teacher text for priors counted on growing shares of the teacher corpus
    (`train_tok`: the run's training records, tokenized), alone and combined with the proxy. With the scale columns
    (`curve_scale`) each point's proxy knows no more records than the point (`bayeskd.lab.scale.point_proxy`,
    `align`: the run's alignment); without them the proxy is the pipeline's at every point (a curve of the prior)."""
    from transformers import AutoModelForCausalLM

    from bayeskd.data import load_teacher_records, tokenize_records
    from bayeskd.core.combine import combine
    from bayeskd.posterior.proxy import ProxyPosterior
    from bayeskd.priors.ngram import NGramPrior

    train_seqs = train_tok.response_sequences()
    held, _ = load_teacher_records(str(run / "teacher_heldout.jsonl"))
    held_tok = tokenize_records(held, tok)
    V = held_tok.vocab_size
    prior_config = NGramPrior.load(run / "prior" / "prior").config()  # the pipeline's prior, refit on less data
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    t_lp, valid = response_logprobs(teacher, held_tok)
    seqs = held_tok.response_sequences()
    proxy = ProxyPosterior(pipeline_proxy, top_k=cfg.top_k)
    proxy_rows = proxy.proxy_topk(held_tok, range(len(held_tok)), V)
    curve = [{"samples": 0, "tokens": 0, "proxy": _mean_kl(t_lp, proxy_rows, valid)}]
    if cfg.curve_scale:  # the scale columns (bayeskd.lab.scale)
        from bayeskd.lab.scale import curve_point, estimation_costs, point_proxy

        lo = min(cfg.eval_records, max(0, len(train_tok) - cfg.calibration_records))  # the calibration records
        cal = list(range(lo, min(lo + cfg.calibration_records, len(train_tok))))
    for frac in cfg.corpus_fractions:
        n = max(1, int(round(frac * len(train_seqs))))
        prior = NGramPrior(**prior_config).fit(train_seqs[:n])
        p_rows = prior.topk(seqs, cfg.top_k)  # held-out text: not in the counts, no leave-one-out needed
        n_proxy, n_rows, extra = proxy, proxy_rows, {}
        if cfg.curve_scale:  # the proxy a user with these n records has
            proxy_dir, extra["proxy_records"] = point_proxy(paths, run, cfg, n, pipeline_proxy, align)
            if proxy_dir != pipeline_proxy:
                n_proxy = ProxyPosterior(proxy_dir, top_k=cfg.top_k)
                n_rows = n_proxy.proxy_topk(held_tok, range(len(held_tok)), V)
        curve.append({"samples": n, "tokens": int(sum(len(s) for s in train_seqs[:n])),
                      "prior": _mean_kl(t_lp, p_rows, valid),
                      "posterior": _mean_kl(t_lp, combine(p_rows, n_rows, top_k=cfg.top_k, **combo), valid),
                      "proxy": _mean_kl(t_lp, n_rows, valid) if n_rows is not proxy_rows else curve[0]["proxy"],
                      **extra})
        if cfg.curve_scale:
            row = curve[-1]
            row.update(curve_point(n, train_tok, held_tok, t_lp, valid, n_proxy, n_rows, cal, prior, cfg.top_k))
            row["best_component"] = min(row["prior"], row["suffix prior"], row["proxy"])
            row["costs"] = estimation_costs(str(train_records(run, cfg)), n, paths["tokenizer"], pipeline_proxy,
                                            order=cfg.order, top_k=cfg.top_k, combo=combo, workdir=run)
    return curve


DATA_SETTINGS = ("samples_per_prompt", "max_prompts", "max_new_tokens", "temperature", "order", "top_k",
                 "top_logprobs", "keep_empty", "prompt_pool", "evidence_prompts")
# settings added after runs were made: left out of the stamps at their defaults, so those runs stay valid
LATE_SETTINGS = ("prompt_pool", "evidence_prompts", "student_max_steps", "align_records", "records_format")
# in no stamp: which rows run, how the teacher is sampled (not what), what the report adds
UNSTAMPED = ("seeds", "methods", "cross_tokenizer", "sample_max_batch", "sample_concurrency", "curve_scale",
             "curve_students")
RECORDS_VERSION = 2  # 2: records name the tokenizer of their log-probabilities (older ones read as another's)
# How the samples are stored, not what they are: not a data setting (a run sampled as JSONL converts and goes on),
# but everything read from the records file is redone when it changes, so no output of one format passes for the
# other's (the conversion is lossless: they come out the same)
RECORDS_SETTINGS = ("records_format",)
RECORDS_DERIVED = ("prior", "posterior", "aligned_proxy")  # besides DERIVED
ALIGN_SETTINGS = ("align", "align_sft_epochs", "align_rounds", "align_lr", "dpo_lr", "batch_size", "align_records")
# what depends on every training setting
DERIVED = (POSTERIOR_DIR, TEXT_DIR, BUCKET_DIR, K5_DIR, "proxy_targets", "students", "recipe", "curves", "cross",
           "onpolicy", "curve_students")


def _check_stamps(run: Path, cfg: LabRunConfig, force: bool) -> None:
    """The teacher samples and the prior/posterior depend on DATA_SETTINGS: a run made with others is refused
    (or redone with `force`). The aligned proxy depends on ALIGN_SETTINGS, the other trained models on every
    setting (seeds and methods aside): when those change, what depends on them is retrained."""
    defaults = LabRunConfig().to_dict()
    settings = {k: v for k, v in cfg.to_dict().items()
                if k not in UNSTAMPED and not (k in LATE_SETTINGS and v == defaults[k])}
    study = {k: settings.pop(k) for k in list(settings) if k.startswith("onpolicy_")}  # only the study's rows
    check_stamp(run / "run.json", {**{k: settings[k] for k in DATA_SETTINGS if k in settings},
                                   "records": RECORDS_VERSION},
                what="a lab run",
                hint="pass force to redo it", error_cls=LabError, force=force)
    train_stamp = run / "train.json"
    have = read_stamp(train_stamp)
    changed = settings_diff(have, settings) if have is not None else []
    if changed:
        if set(changed) & set(ALIGN_SETTINGS):
            shutil.rmtree(run / "aligned_proxy", ignore_errors=True)
        if set(changed) & set(RECORDS_SETTINGS):
            for name in RECORDS_DERIVED:
                shutil.rmtree(run / name, ignore_errors=True)
        for name in DERIVED:
            shutil.rmtree(run / name, ignore_errors=True)
    atomic_write_json(train_stamp, settings)
    study_stamp = run / "onpolicy" / "onpolicy.json"
    if (read_stamp(study_stamp) or study) != study:
        shutil.rmtree(run / "onpolicy", ignore_errors=True)
    if any(m in ONPOLICY_METHODS for m in cfg.methods):
        (run / "onpolicy").mkdir(parents=True, exist_ok=True)
        atomic_write_json(study_stamp, study)


@contextmanager
def _output_to(path: Path, log: Callable[[str], None]):
    """Everything the stages print (progress bars, the Trainer's per-step logs, library warnings and logging) goes
    to the log file `path`; the caller's `log` gets the stage lines and the tables (and the file a copy). Yields
    that `log`."""
    import logging
    import sys
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    import transformers

    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        def tee(message: str) -> None:
            f.write(message + "\n")
            with redirect_stdout(terminal):
                log(message)

        handler = logging.StreamHandler(f)
        logging.getLogger().addHandler(handler)
        transformers.logging.disable_default_handler()  # it holds the real stderr
        transformers.logging.add_handler(handler)
        try:
            with redirect_stdout(f), redirect_stderr(f), warnings.catch_warnings():
                warnings.showwarning = lambda msg, cat, file, line, *_: f.write(
                    warnings.formatwarning(msg, cat, file, line))
                yield tee
        finally:
            transformers.logging.remove_handler(handler)
            transformers.logging.enable_default_handler()
            logging.getLogger().removeHandler(handler)


def _align_holdout(cfg: LabRunConfig, data: str) -> list[int] | range:
    """The records the proxy's alignment never sees: the scored and the calibration ones, and with `align_records`
    every record after that many more."""
    scored = cfg.eval_records + cfg.calibration_records
    if cfg.align_records is None:
        return range(scored)
    n = count_records(Path(data))
    return [*range(scored), *range(scored + cfg.align_records, n)]


def _sample(paths, run: Path, cfg: LabRunConfig, prompts: list[str], held_prompts: list[str], seed: int,
            progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample the teacher over HTTP (`sample_teacher`): run/teacher_train.jsonl and run/teacher_heldout.jsonl. With
    `evidence_prompts` below the prompts, the training samples of the first ones carry the revealed top
    log-probabilities and the rest are text only (sampled apart, then written one after the other)."""
    train, held = run / "teacher_train.jsonl", (held_prompts, run / "teacher_heldout.jsonl", seed + 1, 1, 0)
    e = cfg.evidence_prompts
    if e is None or e >= len(prompts) or not cfg.top_logprobs or train.exists():  # (exists: reused)
        return tuple(sample_teacher(paths["teacher"], [(prompts, train, seed, cfg.samples_per_prompt,
                                                        cfg.top_logprobs), held], cfg, progress))
    parts = [run / "teacher_train_evidence.jsonl", run / "teacher_train_text.jsonl"]
    s_ev, s_text, s_held = sample_teacher(paths["teacher"], [
        (prompts[:e], parts[0], seed, cfg.samples_per_prompt, cfg.top_logprobs),
        (prompts[e:], parts[1], seed + 2, cfg.samples_per_prompt, 0), held], cfg, progress)
    if not train.exists():
        atomic_write_bytes(train, parts[0].read_bytes() + parts[1].read_bytes())
    s_train = {k: s_ev.get(k, 0) + s_text.get(k, 0) for k in set(s_ev) | set(s_text)}
    return s_train, s_held


def run_lab(root: str = "runs/lab", preset: str = "tiny", log: Callable[[str], None] = print,
            **kwargs: Any) -> dict[str, Any]:
    """Run the whole lab (module docstring; keywords: `_run_lab`'s), one run per run directory at a time. `log` gets
    one line per stage and the tables; everything else the stages print goes to root/<preset>/run.log."""
    from bayeskd.locks import output_lock

    lab_preset, run_name = resolve_preset(preset)
    base = Path(root) / lab_preset.name
    # the lock and the log beside run/ (run.lock, run.log), since force may remove run/ itself
    with output_lock(base / run_name, "lab run", file=True), _output_to(base / f"{run_name}.log", log) as tee:
        tee(f"[lab] {time.strftime('%Y-%m-%d %H:%M:%S')}: preset {preset}, root {root} (the stages' own output: "
            f"{base / f'{run_name}.log'})")
        return _run_lab(root, preset, log=tee, **kwargs)


def _run_lab(root: str, preset: str, *, config: LabRunConfig | None = None, force: bool = False,
             progress: bool = True, log: Callable[[str], None] = print, **settings: Any) -> dict[str, Any]:
    """`settings`: `LabRunConfig` fields that replace the preset's (or `config`'s) values; `seeds` or `methods` None:
    the preset's."""
    from bayeskd.data import load_tokenized_records, load_tokenizer
    from bayeskd.priors.estimate import estimate_prior
    from bayeskd.posterior.estimate import estimate_posterior

    lab_preset, run_name = resolve_preset(preset)  # a scale preset: an existing lab's models, another run
    name = preset if isinstance(preset, str) else lab_preset.name
    base_name = lab_preset.base_preset().name  # a sharp preset (`tiny-sharp`) runs with its base lab's settings
    cfg = config or RUN_CONFIGS.get(name) or RUN_CONFIGS.get(lab_preset.name) or RUN_CONFIGS.get(base_name,
                                                                                                 LabRunConfig())
    unknown = sorted(set(settings) - {f.name for f in fields(LabRunConfig)})
    if unknown:
        raise ValueError(f"unknown lab run setting(s): {', '.join(unknown)}")
    settings = {k: v for k, v in settings.items() if not (k in ("seeds", "methods") and v is None)}
    if "methods" in settings:
        bad = [m for m in settings["methods"] if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    cfg = replace(cfg, **{k: tuple(v) if isinstance(v, (list, range)) else v for k, v in settings.items()})
    if cfg.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {cfg.seeds}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with _stage("build lab", log, timings):
        paths = build_lab(root, lab_preset, progress=progress)
    run = Path(paths["root"]) / run_name
    _check_stamps(run, cfg, force)

    prompts = train_prompts(lab_preset, cfg.prompt_pool)[:cfg.max_prompts]
    held_prompts = [r["prompt"] for r in load_lab_prompts(paths["root"])]
    with _stage("sample the black-box teacher (serve-teacher + generate over HTTP)", log, timings):
        s_train, s_held = _sample(paths, run, cfg, prompts, held_prompts, lab_preset.seed, progress)
    train_path = train_records(run, cfg)  # what every stage reads from here on
    if cfg.records_format == "parquet" and not train_path.exists():
        with _stage("convert the training records to Parquet", log, timings):
            converted = to_parquet(run / "teacher_train.jsonl", train_path)
            log(f"[lab] {converted['records']} records: {converted['input_bytes'] / 2**20:.1f} MiB of JSONL -> "
                f"{converted['output_bytes'] / 2**20:.1f} MiB of Parquet ({train_path})")
    train_file = str(train_path)
    with _stage("estimate-prior", log, timings):
        prior_summary = estimate_prior(train_file, paths["tokenizer"], out=str(run / "prior"),
                                       order=cfg.order, top_k=cfg.top_k, write_topk=True, codec="raw")
    with _stage("estimate-posterior", log, timings):
        estimate_posterior(train_file, str(run / "prior"), paths["proxy"],
                           str(run / "posterior"), top_k=cfg.top_k, batch_size=16, no_evidence=True, codec="raw",
                           calibrate=False)  # the fixed log-linear a = b = 1 row
    align_summary = calibration = None

    def align(data: str, out: Path, holdout) -> dict[str, Any]:
        """The lab's proxy alignment (also of the scale curve's points) on `data`, never on `holdout`."""
        from bayeskd.distillation.align_proxy import align_proxy

        return align_proxy(data, paths["proxy"], str(out), sft_epochs=cfg.align_sft_epochs, rounds=cfg.align_rounds,
                           max_new_tokens=cfg.max_new_tokens, sft_learning_rate=cfg.align_lr,
                           learning_rate=cfg.dpo_lr, batch_size=cfg.batch_size, seed=lab_preset.seed,
                           holdout_records=holdout, training_args={"disable_tqdm": not progress})

    if cfg.align:
        with _stage("align the proxy (SFT + preference rounds)", log, timings):
            # never trained on what the lab scores or calibrates on (cross-fitting)
            align_summary = align(train_file, run / "aligned_proxy", _align_holdout(cfg, train_file))
    pipeline_proxy = align_summary["final"] if cfg.align else paths["proxy"]
    tok = load_tokenizer(paths["tokenizer"])
    # the training records, read and tokenized once for every stage of this process (load_tokenized_records
    # remembers them: the students read them from there too)
    train_tok = load_tokenized_records(train_path, tok)[0]
    with _stage("calibrate the combination", log, timings):
        calibration = _calibrate(run, cfg, pipeline_proxy, train_tok)
        shown = {k: v for k, v in calibration["best"].items() if k != "theta"}  # (adaptive: its weights in the report)
        log(f"[lab] calibrated combination: {shown} (teacher-token NLL "
            f"{calibration['table'][0]['nll']:.4f}; a=b=1 log-linear: "
            f"{next(r['nll'] for r in calibration['table'] if r.get('a') == 1.0 and r.get('b') == 1.0):.4f})")
    with _stage("estimate-posterior (calibrated; conditioned on the revealed log-probabilities)", log, timings):
        estimate_posterior(train_file, str(run / "prior"), pipeline_proxy, str(run / POSTERIOR_DIR),
                           top_k=cfg.top_k, batch_size=16, codec="raw", **calibration["best"])
        if cfg.top_logprobs:  # what the conditioning is measured against: text only, and the revealed top-k alone
            estimate_posterior(train_file, str(run / "prior"), pipeline_proxy, str(run / TEXT_DIR),
                               top_k=cfg.top_k, batch_size=16, codec="raw", no_evidence=True, **calibration["best"])
            if "bucket-kd" in cfg.methods:  # (read by bucket-KD only)
                estimate_posterior(train_file, str(run / "prior"), pipeline_proxy, str(run / BUCKET_DIR),
                                   top_k=cfg.top_k, batch_size=16, codec="raw", evidence_mode="evidence_only",
                                   **calibration["best"])
            if "posterior-kd-k5" in cfg.methods:
                estimate_posterior(train_file, str(run / "prior"), pipeline_proxy, str(run / K5_DIR),
                                   top_k=cfg.top_k, batch_size=16, codec="raw", evidence_top_k=5,
                                   **calibration["best"])
    if "proxy-kd" in cfg.methods:
        with _stage("Proxy-KD targets (the proxy's own top-K)", log, timings):
            estimate_posterior(train_file, None, pipeline_proxy,
                               str(run / "proxy_targets"), tokenizer=paths["tokenizer"], top_k=cfg.top_k,
                               batch_size=16, codec="raw")
    report: dict[str, Any] = {
        "preset": name, "config": cfg.to_dict(), "lab": paths["root"],
        "data": {"train_records": len(train_tok), "heldout_records": s_held.get("written"),
                 "train_tokens": int(sum(len(s) for s in train_tok.response_sequences())),
                 "train_prompts": len(prompts), "train_prompts_distinct": len(set(prompts)),
                 "heldout_prompts_distinct": len(set(held_prompts)),
                 "prompts_shared": len(set(prompts) & set(held_prompts)),
                 "prompts_sharing_text": sum(any(p in h or h in p for h in set(held_prompts)) for p in set(prompts)),
                 "empty_samples": s_train.get("empty", 0),
                 "blank_samples_kept": s_train.get("empty_kept", 0)},
    }
    with _stage("evaluate estimates", log, timings):
        report["estimation"] = _estimation(paths, run, cfg, tok, train_tok, log, pipeline_proxy, calibration["best"])
        report["corpus_curve"] = _corpus_curve(paths, run, cfg, tok, train_tok, pipeline_proxy, calibration["best"],
                                               align)
    with _stage("the Bayesian part against its components (n-gram and suffix prior, fixed and adaptive)", log,
                timings):
        from bayeskd.lab.bayes import bayes_table

        report["bayes"] = bayes_table(paths, run, cfg, tok, train_tok, pipeline_proxy, log,
                                      ngram_calibration=calibration)
    with _stage("distill and evaluate students", log, timings):
        report["students"], cfg = students(paths, run, cfg, tok, progress, log, pipeline_proxy=pipeline_proxy,
                                           calibration=calibration)
        report["config"] = cfg.to_dict()  # with the recipe chosen on validation prompts
    if cfg.curve_students:
        from bayeskd.lab.scale import curve_students

        with _stage("students at points of the corpus curve", log, timings):
            report["curve_students"] = curve_students(paths, run, cfg, tok, progress, log, pipeline_proxy,
                                                      report["corpus_curve"], calibration["best"], align)
    if cfg.cross_tokenizer and cfg.top_logprobs:
        from bayeskd.lab.cross import run_cross

        with _stage("teacher B, another tokenizer: sample, estimate, distill, evaluate", log, timings):
            report["cross_tokenizer"] = run_cross(paths, run, cfg, prompts, held_prompts, pipeline_proxy,
                                                  calibration["best"], lab_preset, progress, log)
    est, stu = report["estimation"], report["students"]  # the truth's mean entropy (nats/token) where it scores
    report["teacher"] = {"entropy": {"estimation": est.pop("teacher_entropy"), "heldout": stu.pop("teacher_entropy")},
                         "positions": {"estimation": est["positions"], "heldout": stu.pop("teacher_positions")},
                         "sharpen": read_manifest(paths["manifest"]).get("sharpen")}  # None: the teacher as trained
    report["calibration"] = calibration
    if align_summary is not None:
        report["alignment"] = {k: align_summary.get(k) for k in ("alignment", "diagnostics_before",
                                                                 "diagnostics_after")}
    report["targets"] = check_targets(report)
    report["timings"] = {**timings, "total": round(time.perf_counter() - t0, 2)}
    report["prior_summary"] = {k: prior_summary.get(k) for k in ("tokens", "records", "seconds")}
    atomic_write_json(run / "report.json", json.loads(json.dumps(report)))
    text = format_report(report)
    atomic_write_bytes(run / "report.md", text.encode())
    log(text)
    return report
