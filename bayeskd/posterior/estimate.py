"""The job behind `bayeskd estimate-posterior`: load teacher records, the prior and the proxy, calibrate the
combination (by default, on records the proxy was not trained on), and write posterior shards
(`ProxyPosterior.estimate`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bayeskd.core.names import CODEC_HELP, CODECS, EVIDENCE_MODES, MODES
from bayeskd.job_config import job_config, setting
from bayeskd.integrity import RECORD, atomic_write_json, load_npy, read_json, verify_checksums
from bayeskd.records import records_fingerprint
from bayeskd.posterior.calibrate import calibrate_on_records, calibration_indices, index_ranges
from bayeskd.posterior.proxy import ProxyPosterior
from bayeskd.posterior.shards import rank_world
from bayeskd.core.sparse import MANIFEST, CacheMismatchError, read_manifest
from bayeskd.locks import locks_output


COMBINATION_DEFAULTS: dict[str, Any] = {"mode": "log_linear", "a": 1.0, "b": 1.0, "c": 1.0, "w": 0.5}


@dataclass
class EstimatePosteriorConfig:
    """The `estimate-posterior` job's settings, its one config: every field is a `bayeskd estimate-posterior`
    option (`bayeskd.cli_config.config_options`), so each default is written here once. The inputs (data, prior,
    proxy, tokenizer, output) are the job's arguments."""
    top_k: int = setting(64, "Entries per position in the target shards.", min=1)
    proxy_top_k: int | None = setting(None, "Proxy entries per position before combining (default: --top-k).",
                                      min=1)
    mode: str | None = setting(None, "How prior and proxy combine (default: chosen by calibration, else log_linear). "
                               "Giving it or --a/--b/--c/--w turns the default calibration off.", choices=MODES)
    a: float | None = setting(None, "Log-linear prior exponent (default 1).")
    b: float | None = setting(None, "Log-linear proxy exponent (default 1).")
    c: float | None = setting(None, "Dirichlet concentration of the proxy (default 1).")
    w: float | None = setting(None, "Mixture weight of the prior (default 0.5).")
    evidence: float = setting(0.0, "Observations added for the teacher's own token.")
    no_evidence: bool = setting(False, "Ignore the teacher's top-k log-probabilities in the data (by default the "
                                "posterior is conditioned on them wherever the records carry them).")
    evidence_top_k: int | None = setting(None, "Use only the k most likely revealed entries per position.", min=1)
    evidence_mode: str = setting("condition", "condition: revealed entries exact, prior x proxy spreads the rest "
                                 "(capped); evidence_only: the baselines' targets (revealed entries and a uniform "
                                 "tail).", choices=EVIDENCE_MODES)
    calibrate: bool | None = setting(None, "Choose --mode and its weights by the likelihood of the teacher's own "
                                     "tokens (prior leave-one-out, proxy on records it was not trained on: an aligned "
                                     "proxy's held-out slice). Default: on with a prior unless --mode/--a/--b/--c/--w "
                                     "are given; --calibrate with them is refused; --no-calibrate uses them (or "
                                     "log_linear a=b=1).")
    calibration_records: int = setting(256, "At most this many records are scored by the calibration.", min=1)
    calibrate_on_training_records: bool = setting(False, "Calibrate even on records the proxy was trained on (it then "
                                                  "looks better than it is); without it, a proxy aligned on all these "
                                                  "records is refused.")
    leave_one_out: bool = setting(True, "Query the prior with each position's own occurrence removed from its counts "
                                  "(the prior must have been counted on these records).")
    teacher_logprob: bool | None = setting(None, "Store the proxy's log-probability of each teacher token (shard "
                                           "extra proxy_teacher_logprob). Default: on for proxy-only targets, off "
                                           "with a prior.")
    reuse_prior_topk: bool = setting(True, "Read the prior's rows from PRIOR/topk (estimate-prior --write-topk) when "
                                     "they were made with the same K, leave-one-out setting and records, instead of "
                                     "computing them again (the same rows; within the codec's bound where they were "
                                     "written compact).")
    batch_size: int = setting(8, "Records per proxy forward pass.", min=1)
    dtype: str = setting("float32", "The proxy's dtype.", choices=("float32", "bfloat16", "float16"))
    device: str | None = setting(None, "torch device (default: cuda if available, else cpu).")
    shard_records: int = setting(256, "Whole records per output shard.", min=1)
    max_shards: int | None = setting(None, "Write at most this many new shards, then stop (a partial run; the same "
                                     "command resumes it).", min=1)
    codec: str = setting("compact", CODEC_HELP, choices=CODECS)
    samples: int | None = setting(None, "Sampled targets: per position, the --keep-top largest entries exactly plus "
                                  "this many draws from the rest of the top-K posterior and its tail (unbiased for "
                                  "the full forward-KL gradient; docs/MATH.md). Default: top-K targets.", min=1)
    keep_top: int = setting(0, "With --samples: entries kept exactly before sampling the rest.", min=0)
    sample_seed: int = setting(0, "With --samples: the draws' seed.")
    sliding_window: bool = setting(False, "Read records longer than the proxy's context in windows of it, half a "
                                   "window apart (every position keeps at least half the context); without it such "
                                   "records are refused by name.")

    def __post_init__(self):
        for name, choices in (("mode", MODES), ("evidence_mode", EVIDENCE_MODES), ("codec", CODECS)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.calibration_records < 1:
            raise ValueError(f"calibration_records must be >= 1, got {self.calibration_records}")


def _calibrate(post: ProxyPosterior, prior, tokenized, indices: list[int]) -> dict[str, Any]:
    """Set `post`'s combination to the one that best explains the teacher tokens of the records `indices` (prior
    queried with leave-one-out); returns the scores."""
    result = calibrate_on_records(prior, post, tokenized, indices, post.top_k)
    post.mode = result["best"]["mode"]
    post.theta = result["best"].get("theta")
    for key in ("a", "b", "c", "w"):
        if key in result["best"]:
            setattr(post, key, float(result["best"][key]))
    return result


def _check_fits_proxy(proxy, tokenized, data, sliding_window: bool = False) -> int | None:
    """Targets cover every response token, so a record longer than the proxy's context cannot be truncated (see
    `bayeskd.data.truncation_window`): refuse it by name before any work, not an index error deep in the model
    (or positions past the ones it was trained on, silently), unless `sliding_window`. Returns the window for
    ProxyPosterior: the proxy's context where some record is longer and `sliding_window`, else None."""
    from bayeskd.data import DataError

    try:
        if isinstance(proxy, (str, os.PathLike)):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(proxy))
        else:
            config = getattr(proxy, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 - no readable config: the model load reports it
        return None
    if not isinstance(limit, int) or len(tokenized) == 0:
        return None
    lengths = tokenized.lengths
    i = int(lengths.argmax())
    if lengths[i] <= limit:
        return None
    if not sliding_window:
        raise DataError(f"{data}: record {i} (counting kept records from 0) has {int(lengths[i])} tokens, more than "
                        f"the proxy's context ({limit}), and {int((lengths > limit).sum())} records in all; targets "
                        "cover whole responses: pass --sliding-window to read them in windows of the proxy's context "
                        "(every position keeps at least half of it; the prior stays valid), or shorten them")
    return int(limit)


def _check_counted_on(pdir: Path, records: list) -> None:
    """Leave-one-out subtracts each position's own occurrence from the prior's counts: every record must be one it
    counted, or it removes counts that belong to other occurrences."""
    import numpy as np

    from bayeskd.records import record_digests
    from bayeskd.priors.estimate import COUNTED_ON

    path = pdir / COUNTED_ON
    if not path.exists():  # a prior made before this file existed (or saved by hand): the top-K check remains
        return
    missing = ~np.isin(record_digests(records), load_npy(path))
    if missing.any():
        raise ValueError(f"{pdir}: {int(missing.sum())} of the {len(records)} records given (e.g. record "
                         f"{int(np.flatnonzero(missing)[0])}) are not among those the prior was counted on (other "
                         "data, split or --max-records), so leave-one-out would remove counts that belong to other "
                         "occurrences; pass --no-leave-one-out, or estimate the prior on this data")


@locks_output()
def estimate_posterior(data: str | None = None, prior_dir: str | None = None, proxy=None, out: str | None = None,
                       *, tokenizer: str | None = None, config: EstimatePosteriorConfig | None = None,
                       theta: dict[str, Any] | None = None, skip_bad: bool = False, split: str = "train",
                       max_records: int | None = None, **settings: Any) -> dict[str, Any]:
    """The job behind `bayeskd estimate-posterior`: load the teacher records and the prior saved by
    `estimate_prior` (`prior_dir/prior`, or `prior_dir` itself), tokenize with `tokenizer` (default: the one
    named in `prior_dir/summary.json`), and write posterior shards with the proxy into `out`.

    `prior_dir=None` (or "none"): proxy-only targets (the proxy's own top-K rows, mode "proxy"); then `data` is
    needed and the tokenizer defaults to the proxy's. `teacher_logprob`: store the per-row extra
    "proxy_teacher_logprob" (default: True without a prior). With `reuse_prior_topk`, the prior's top-K rows
    are read from `prior_dir/topk` (`estimate-prior --write-topk`) when it was made with the same K,
    leave-one-out setting and records, instead of being recomputed (the shards are the same).
    The settings: `config` (an `EstimatePosteriorConfig`) or `settings`, its fields (top_k, mode, codec, ...).
    The combination: `mode` and its weights `a`, `b` (log-linear), `c` (Dirichlet), `w` (mixture), `theta` (adaptive:
    `fit_adaptive` settings, which calibration fits); unset ones take
    `COMBINATION_DEFAULTS` (log-linear, a = b = 1). `calibrate` chooses them instead, by the likelihood of the
    teacher's own tokens on up to `calibration_records` records (`bayeskd.posterior.calibrate`):
    - None (default): calibrate when there is a prior and none of mode/a/b/c/w is given; given settings are used
      as they are (the user chose them);
    - True: calibrate; giving mode/a/b/c/w as well is refused (which one to use would be a guess);
    - False: use the given settings (or the defaults).
    Calibration never scores the proxy on records it was trained on (cross-fitting, `calibration_indices`): an
    aligned proxy is scored on its held-out records, one trained on all of these records (or on other data) is
    refused with a ValueError unless `calibrate_on_training_records`, and a proxy without training info (a base
    model) on the first records. The summary's "calibration" says whether and why it ran, which records were
    scored and why, and the choice (also in the manifest's config).

    Records that carry the teacher's top-k log-probabilities (`bayeskd generate --top-logprobs k`) condition the
    posterior at the positions they cover (`bayeskd.core.condition`; the combination chosen for the other
    positions is unchanged), unless `no_evidence`. `evidence_top_k`: use only the k most likely revealed entries
    per position; `evidence_mode` "evidence_only": the baselines' targets (the revealed entries, a uniform tail).

    A record longer than the proxy's context is refused by name, or with `sliding_window` read in windows of the
    proxy's context half a window apart, each row from the window that gives it the most context (at least half
    of it). Windows rather than skipping: every record keeps its targets, so the rows still line up with the
    data for `distill` and a prior counted on all of it stays valid for leave-one-out."""
    from bayeskd.data import DataError, load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.priors.base import load_prior

    cfg = job_config(EstimatePosteriorConfig, config, settings, "estimate_posterior")
    mode, a, b, c, w = cfg.mode, cfg.a, cfg.b, cfg.c, cfg.w
    calibrate, leave_one_out, top_k = cfg.calibrate, cfg.leave_one_out, cfg.top_k
    if proxy is None or out is None:
        raise ValueError("estimate_posterior needs proxy and out")
    if prior_dir is not None and str(prior_dir).lower() == "none":
        prior_dir = None
    prior = pdir = None
    pconfig: dict[str, Any] = {}
    if prior_dir is not None:
        pdir = Path(prior_dir)
        if not pdir.exists():
            raise FileNotFoundError(f"{prior_dir}: prior directory does not exist")
        if (pdir / RECORD).exists():  # written by estimate-prior (or a saved prior): every file as written
            verify_checksums(pdir, hint=f"rerun estimate-prior --out {pdir} to write it again")
        psummary = read_json(pdir / "summary.json") if (pdir / "summary.json").exists() else {}
        if (pdir / "prior_config.json").exists():
            pconfig = read_json(pdir / "prior_config.json")
        tokenizer = tokenizer or psummary.get("tokenizer")
        if tokenizer is None:
            raise DataError(f"{prior_dir}: no summary.json naming the tokenizer; pass --tokenizer")
        data = data or psummary.get("data") or pconfig.get("data")
        if data is None:
            raise DataError(f"{prior_dir}: no summary.json naming the data; pass --data")
        prior = load_prior(pdir)
    else:
        if data is None:
            raise DataError("proxy-only targets (no --prior) need --data")
        if tokenizer is None:
            if not isinstance(proxy, (str, os.PathLike)):
                raise DataError("proxy-only targets with an in-memory proxy need --tokenizer")
            tokenizer = str(proxy)  # the proxy shares the student tokenizer; its checkpoint usually carries it
    tok = load_tokenizer(tokenizer)
    all_records, report = load_teacher_records(data, split=split, skip_bad=skip_bad)
    records = all_records if max_records is None else all_records[:max_records]
    if prior is not None and leave_one_out:
        _check_counted_on(pdir, records)
    tokenized = tokenize_records(records, tok)
    window = _check_fits_proxy(proxy, tokenized, data, cfg.sliding_window)
    want = pconfig.get("tokenizer_fingerprint")
    if want is not None and want != tokenized.fingerprint:
        raise CacheMismatchError(f"{prior_dir}: the prior was estimated with another tokenizer (fingerprint "
                                 f"{want[:12]}…, {tokenizer} has {tokenized.fingerprint[:12]}…)")
    given = {k: v for k, v in {"mode": mode, "a": a, "b": b, "c": c, "w": w, "theta": theta}.items()
             if v is not None}
    if calibrate and prior is None:
        raise ValueError("calibrate chooses how to combine prior and proxy: it needs a prior")
    if calibrate and given:
        raise ValueError(f"calibrate chooses the combination itself; drop {', '.join('--' + k for k in given)} "
                         "or pass --no-calibrate to use them")
    auto = calibrate is None
    if auto:
        calibrate = prior is not None and not given
    if calibrate:  # the scored records are settled before the proxy is loaded: a refusal costs nothing
        scored, why = calibration_indices(proxy, records_fingerprint(all_records), len(all_records),
                                          cfg.calibration_records, force=cfg.calibrate_on_training_records)
        if not [i for i in scored if i < len(tokenized)]:
            raise ValueError(f"the records calibration may score ({why['scored']}) lie beyond --max-records "
                             f"{max_records}; raise it or pass --no-calibrate")
        scored = [i for i in scored if i < len(tokenized)]
        why["scored"] = index_ranges(scored)
    post = ProxyPosterior(proxy, dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size, evidence=cfg.evidence,
                          top_k=top_k, proxy_top_k=cfg.proxy_top_k, window=window, **{**COMBINATION_DEFAULTS, **given})
    if calibrate:
        calibration = {"calibrated": True, **why, "calibrate_on_training_records": cfg.calibrate_on_training_records,
                       **_calibrate(post, prior, tokenized, scored)}
    else:
        calibration = {"calibrated": False, "reason": "no prior" if prior is None
                       else "the combination was given" if auto else "calibrate off"}
    prior_topk = None
    if prior is not None and cfg.reuse_prior_topk and (pdir / "topk" / MANIFEST).exists():
        topk_manifest = read_manifest(pdir / "topk")
        if (topk_manifest["k"] == top_k and topk_manifest["config"].get("leave_one_out") == bool(leave_one_out)
                and sum(sh["rows"] for sh in topk_manifest["shards"].values())
                == sum(len(x) for x in tokenized.response_sequences())):  # complete, for these records
            prior_topk = pdir / "topk"  # other mismatches (tokenizer, lengths) are refused with a clear error
    evidence, evidence_report = None, None
    if not cfg.no_evidence and any("logprobs" in r for r in records):
        from bayeskd.posterior.evidence import evidence_rows

        evidence, evidence_report = evidence_rows(records, tokenized, tok, top_k=cfg.evidence_top_k)
    summary = post.estimate(tokenized, prior, out, leave_one_out=leave_one_out, shard_records=cfg.shard_records,
                            max_shards=cfg.max_shards, teacher_logprob=cfg.teacher_logprob, prior_topk=prior_topk,
                            evidence=evidence, evidence_mode=cfg.evidence_mode, evidence_top_k=cfg.evidence_top_k,
                            codec=cfg.codec, samples=cfg.samples, keep_top=cfg.keep_top,
                            sample_seed=cfg.sample_seed)
    summary["evidence"] = evidence_report
    summary["calibration"] = calibration
    summary.update({"data": str(data), "tokenizer": str(tokenizer),
                    "prior_dir": None if prior_dir is None else str(prior_dir),
                    "skipped_records": int(report.skipped),
                    "records_in_windows": 0 if window is None else int((tokenized.lengths > window).sum())})
    if rank_world()[0] == 0:
        atomic_write_json(Path(out) / "summary.json", summary)
    return summary
