"""The job behind `bayeskd estimate-posterior`: load teacher records, the prior and the proxy, calibrate the
combination (by default, on records the proxy was not trained on), and write posterior shards
(`ProxyPosterior.estimate`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bayeskd.integrity import RECORD, atomic_write_json, load_npy, read_json, verify_checksums
from bayeskd.records import records_fingerprint
from bayeskd.posterior.calibrate import calibrate_on_records, calibration_indices, index_ranges
from bayeskd.posterior.proxy import ProxyPosterior
from bayeskd.posterior.shards import rank_world
from bayeskd.core.sparse import MANIFEST, CacheMismatchError, read_manifest
from bayeskd.locks import locks_output


COMBINATION_DEFAULTS: dict[str, Any] = {"mode": "log_linear", "a": 1.0, "b": 1.0, "c": 1.0, "w": 0.5}


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
                       *, tokenizer: str | None = None, top_k: int = 64, proxy_top_k: int | None = None,
                       mode: str | None = None, a: float | None = None, b: float | None = None,
                       c: float | None = None, w: float | None = None, theta: dict[str, Any] | None = None,
                       evidence: float = 0.0, batch_size: int = 8, dtype: str = "float32",
                       device: str | None = None, leave_one_out: bool = True, shard_records: int = 256,
                       skip_bad: bool = False, split: str = "train", max_records: int | None = None,
                       max_shards: int | None = None, teacher_logprob: bool | None = None,
                       reuse_prior_topk: bool = True, calibrate: bool | None = None,
                       calibration_records: int = 256, calibrate_on_training_records: bool = False,
                       no_evidence: bool = False, evidence_top_k: int | None = None,
                       evidence_mode: str = "condition", codec: str = "raw", samples: int | None = None,
                       keep_top: int = 0, sample_seed: int = 0, sliding_window: bool = False) -> dict[str, Any]:
    """The job behind `bayeskd estimate-posterior`: load the teacher records and the prior saved by
    `estimate_prior` (`prior_dir/prior`, or `prior_dir` itself), tokenize with `tokenizer` (default: the one
    named in `prior_dir/summary.json`), and write posterior shards with the proxy into `out`.

    `prior_dir=None` (or "none"): proxy-only targets (the proxy's own top-K rows, mode "proxy"); then `data` is
    needed and the tokenizer defaults to the proxy's. `teacher_logprob`: store the per-row extra
    "proxy_teacher_logprob" (default: True without a prior). With `reuse_prior_topk`, the prior's top-K rows
    are read from `prior_dir/topk` (`estimate-prior --write-topk`) when it was made with the same K,
    leave-one-out setting and records, instead of being recomputed (the shards are the same).
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
    window = _check_fits_proxy(proxy, tokenized, data, sliding_window)
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
    if calibration_records < 1:
        raise ValueError(f"calibration_records must be >= 1, got {calibration_records}")
    auto = calibrate is None
    if auto:
        calibrate = prior is not None and not given
    if calibrate:  # the scored records are settled before the proxy is loaded: a refusal costs nothing
        scored, why = calibration_indices(proxy, records_fingerprint(all_records), len(all_records),
                                          calibration_records, force=calibrate_on_training_records)
        if not [i for i in scored if i < len(tokenized)]:
            raise ValueError(f"the records calibration may score ({why['scored']}) lie beyond --max-records "
                             f"{max_records}; raise it or pass --no-calibrate")
        scored = [i for i in scored if i < len(tokenized)]
        why["scored"] = index_ranges(scored)
    post = ProxyPosterior(proxy, dtype=dtype, device=device, batch_size=batch_size, evidence=evidence, top_k=top_k,
                          proxy_top_k=proxy_top_k, window=window, **{**COMBINATION_DEFAULTS, **given})
    if calibrate:
        calibration = {"calibrated": True, **why, "calibrate_on_training_records": calibrate_on_training_records,
                       **_calibrate(post, prior, tokenized, scored)}
    else:
        calibration = {"calibrated": False, "reason": "no prior" if prior is None
                       else "the combination was given" if auto else "calibrate off"}
    prior_topk = None
    if prior is not None and reuse_prior_topk and (pdir / "topk" / MANIFEST).exists():
        topk_manifest = read_manifest(pdir / "topk")
        if (topk_manifest["k"] == top_k and topk_manifest["config"].get("leave_one_out") == bool(leave_one_out)
                and sum(sh["rows"] for sh in topk_manifest["shards"].values())
                == sum(len(x) for x in tokenized.response_sequences())):  # complete, for these records
            prior_topk = pdir / "topk"  # other mismatches (tokenizer, lengths) are refused with a clear error
    evidence, evidence_report = None, None
    if not no_evidence and any("logprobs" in r for r in records):
        from bayeskd.posterior.evidence import evidence_rows

        evidence, evidence_report = evidence_rows(records, tokenized, tok, top_k=evidence_top_k)
    summary = post.estimate(tokenized, prior, out, leave_one_out=leave_one_out, shard_records=shard_records,
                            max_shards=max_shards, teacher_logprob=teacher_logprob, prior_topk=prior_topk,
                            evidence=evidence, evidence_mode=evidence_mode, evidence_top_k=evidence_top_k,
                            codec=codec, samples=samples, keep_top=keep_top, sample_seed=sample_seed)
    summary["evidence"] = evidence_report
    summary["calibration"] = calibration
    summary.update({"data": str(data), "tokenizer": str(tokenizer),
                    "prior_dir": None if prior_dir is None else str(prior_dir),
                    "skipped_records": int(report.skipped),
                    "records_in_windows": 0 if window is None else int((tokenized.lengths > window).sum())})
    if rank_world()[0] == 0:
        atomic_write_json(Path(out) / "summary.json", summary)
    return summary
