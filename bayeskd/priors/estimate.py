"""The job behind `bayeskd estimate-prior`: fit a prior on teacher records (or the embedded defaults) and write
it, with its leave-one-out top-K rows as shards; a plain function a test (or a notebook) can call."""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bayeskd.core.names import CODEC_HELP, CODECS
from bayeskd.core.sparse import CacheMismatchError, ShardWriter, SparseDist, dir_bytes
from bayeskd.integrity import atomic_write_bytes, atomic_write_json, read_json, write_checksums
from bayeskd.job_config import job_config, setting
from bayeskd.locks import locks_output

DEFAULT_CACHE = Path(os.environ.get("BAYESKD_CACHE", Path.home() / ".cache" / "bayeskd"))
SHARD_ROWS = 1 << 18  # rows per prior shard: ~70 MB at K=64


def embedded_defaults(cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """The embedded default data and tokenizer: teacher-style JSONL made from Python's own documentation and a
    BPE tokenizer trained on it. Built once into the cache, reused after."""
    from bayeskd.corpus import embedded_corpus, embedded_teacher_jsonl, train_bpe_tokenizer

    cache = Path(cache_dir or DEFAULT_CACHE) / "embedded"
    cache.mkdir(parents=True, exist_ok=True)
    data = cache / "teacher.jsonl"
    if not data.exists():
        embedded_teacher_jsonl(data)
    tok = cache / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        train_bpe_tokenizer(embedded_corpus(), 4096, tok)
    return str(data), str(tok)


def _vocab_size(tokenizer) -> int:
    # len() counts added tokens; vocab_size may not. Ids must stay below what the student's embedding has,
    # which later stages check against the model config.
    return max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))


PRIOR_KINDS = ("ngram", "suffix")
COUNTED_ON = "counted_records.npy"  # beside the model: a digest of every record it counted (`record_digests`)
SMOOTHINGS = ("kneser_ney", "witten_bell", "dirichlet", "mle")


@dataclass
class EstimatePriorConfig:
    """The `estimate-prior` job's settings, its one config: every field is a `bayeskd estimate-prior` option
    (`bayeskd.cli_config.config_options`), so each default is written here once. The inputs (data, tokenizer,
    output) are the job's arguments."""
    kind: str = setting("ngram", "ngram: an order-N n-gram; suffix: unbounded context (prompt included) from a suffix "
                        "array of the teacher's text, backing off to that n-gram.", choices=PRIOR_KINDS)
    order: int = setting(4, "The n-gram's order.", min=1, max=8)
    max_levels: int = setting(4, "--kind suffix: context levels (distinct occurrence counts) interpolated above the "
                              "n-gram.", min=1)
    max_support: int = setting(1024, "--kind suffix: occurrences read per level (more: evenly spaced ones, as "
                               "infini-gram does).", min=1)
    beta: float | None = setting(None, "--kind suffix: trust in a level's count against its variety (Witten-Bell: "
                                 "1), the same at every context length. Default: one per context-length bucket, "
                                 "chosen by the leave-one-out likelihood of the teacher's own tokens (long exact "
                                 "repeats followed, short contexts smoothed).", min=0, min_open=True)
    beta_records: int = setting(2000, "--kind suffix without --beta: records whose tokens choose the weights.", min=1)
    smoothing: str = setting("kneser_ney", "How the n-gram's counts are smoothed.", choices=SMOOTHINGS)
    alpha: float = setting(1.0, "Dirichlet concentration.")
    top_k: int = setting(64, "Entries per position in the written prior shards.", min=1)
    write_topk: bool = setting(False, "Also write the per-position top-K prior (leave-one-out) as SparseDist shards.")
    leave_one_out: bool = setting(True, "The written top-K rows leave each position's own occurrence out of the "
                                  "counts (what estimate-posterior and distill --proxy query).")
    codec: str = setting("compact", CODEC_HELP, choices=CODECS)
    num_proc: int = setting(1, "Parallel counting processes.", min=1)

    def __post_init__(self):
        for name, choices in (("kind", PRIOR_KINDS), ("smoothing", SMOOTHINGS), ("codec", CODECS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


@locks_output()
def estimate_prior(data: str | None = None, tokenizer: str | None = None, *, out: str,
                   config: EstimatePriorConfig | None = None, skip_bad: bool = False, max_records: int | None = None,
                   split: str = "train", **settings: Any) -> dict[str, Any]:
    """Fit a prior on the teacher responses in `data` (tokenized with `tokenizer`) and save it in `out`.

    kind "ngram": an NGramPrior of `order`; "suffix": a SuffixPrior (prompt + response of every record in a
    suffix array, Witten-Bell over its `max_levels` deepest context levels, backing off to that n-gram); its
    `beta` (None: chosen by the leave-one-out likelihood of the teacher's tokens in the first `beta_records`
    records, `SuffixPrior.choose_beta`: one per bucket of the context length) is saved with it.

    The settings: `config` (an `EstimatePriorConfig`) or `settings`, its fields (kind, order, top_k, write_topk,
    codec, ...). Writes `out/prior/` (the model), optionally `out/topk/` (per-position top-K prior shards,
    leave-one-out by default) and `out/summary.json`. A finished model with the same config is reused, and
    finished shards are kept, so an interrupted run resumes.
    """
    from bayeskd.data import load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.records import record_digests
    from bayeskd.priors.ngram import NGramPrior
    from bayeskd.priors.suffix import SuffixPrior

    cfg = job_config(EstimatePriorConfig, config, settings, "estimate_prior")
    kind, order, smoothing, alpha, top_k = cfg.kind, cfg.order, cfg.smoothing, cfg.alpha, cfg.top_k
    max_levels, max_support, beta = cfg.max_levels, cfg.max_support, cfg.beta
    t0 = time.perf_counter()
    if data is None or tokenizer is None:
        default_data, default_tok = embedded_defaults()
        data, tokenizer = data or default_data, tokenizer or default_tok
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(tokenizer)
    records, report = load_teacher_records(data, split=split, skip_bad=skip_bad)
    if max_records is not None:
        records = records[:max_records]  # the summary's `records` counts what was used
    tokenized = tokenize_records(records, tok)
    sequences = tokenized.response_sequences()
    prompts = tokenized.prompt_sequences() if kind == "suffix" else None
    vocab = _vocab_size(tok)
    if top_k > vocab:
        raise ValueError(f"--top-k {top_k} is larger than the tokenizer's vocabulary ({vocab} tokens)")
    n_tokens = int(sum(len(s) for s in sequences))
    prior_config = {"data": str(data), "tokenizer_fingerprint": tokenized.fingerprint, "order": order,
              "smoothing": smoothing, "alpha": alpha, "vocab_size": vocab, "records": len(records),
              "tokens": n_tokens}
    if kind == "suffix":  # (n-gram configs keep their old form, so finished n-gram runs still resume)
        prior_config.update(kind=kind, max_levels=max_levels, max_support=max_support, beta=beta)

    model_dir = out_dir / "prior"
    cfg_path = out_dir / "prior_config.json"
    t_count = time.perf_counter()
    old_config = read_json(cfg_path) if cfg_path.exists() else None  # damaged: an error naming the file
    if old_config is not None and old_config != prior_config:
        # Never overwrite a finished model made with other settings: the user may still need it.
        diff = sorted(k for k in set(prior_config) | set(old_config) if prior_config.get(k) != old_config.get(k))
        raise CacheMismatchError(f"{out_dir} already holds a prior made with another config (differs in: "
                                 f"{', '.join(diff)}); use a new --out directory")
    model_cls = SuffixPrior if kind == "suffix" else NGramPrior
    beta_table = None
    beta_path = out_dir / "beta_table.json"  # the suffix prior's chosen-beta table, kept for a resumed run's summary
    if model_dir.exists() and old_config == prior_config:
        prior = model_cls.load(model_dir)
        beta_table = read_json(beta_path) if beta_path.exists() else None
        reused = True
    else:
        if kind == "suffix":
            prior = SuffixPrior(order=order, smoothing=smoothing, vocab_size=vocab, alpha=alpha,
                                max_levels=max_levels, max_support=max_support)
            prior.fit(sequences, prompts, num_proc=cfg.num_proc)
            if beta is None:
                n = min(cfg.beta_records, len(sequences))
                _, beta_table = prior.choose_beta(sequences[:n], prompts[:n], k=min(top_k, vocab))
                atomic_write_json(beta_path, beta_table)  # before the config that marks the model finished
            else:
                prior.beta = float(beta)
        else:
            prior = NGramPrior(order=order, smoothing=smoothing, vocab_size=vocab, alpha=alpha)
            prior.fit(sequences, num_proc=cfg.num_proc)
        prior.save(model_dir)
        atomic_write_json(cfg_path, prior_config)
        reused = False
    count_seconds = time.perf_counter() - t_count
    # what the counts came from, so leave-one-out is never applied to other records (estimate-posterior checks it)
    buf = io.BytesIO()
    np.save(buf, record_digests(records))
    atomic_write_bytes(out_dir / COUNTED_ON, buf.getvalue())

    topk_seconds = 0.0
    shards = 0
    if cfg.write_topk:
        t_q = time.perf_counter()
        writer = ShardWriter(out_dir / "topk", vocab, top_k, tokenized.fingerprint,
                             {**prior_config, "top_k": top_k, "leave_one_out": cfg.leave_one_out,
                              **({"beta": list(prior.beta)} if kind == "suffix" else {})},  # the beta chosen
                             codec=cfg.codec)
        # Shards hold whole sequences so a row range maps back to (record, response position).
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        bounds = _shard_bounds(lengths, SHARD_ROWS)
        for i, (lo, hi) in enumerate(tqdm(bounds, desc="prior top-K shards", unit="shard")):
            name = f"shard-{i:05d}"
            shards += 1
            if writer.has_shard(name):
                continue
            dist: SparseDist = prior.topk(sequences[lo:hi], top_k, leave_one_out=cfg.leave_one_out,
                                          **({} if prompts is None else {"contexts": prompts[lo:hi]}))
            writer.write(name, dist, extra={"record_index": torch.arange(lo, hi, dtype=torch.int64),
                                            "lengths": torch.from_numpy(lengths[lo:hi])})
        topk_seconds = time.perf_counter() - t_q

    summary = {
        "data": str(data), "tokenizer": str(tokenizer), "records": len(records),
        "skipped_records": int(report.skipped),
        "tokens": n_tokens, "vocab_size": vocab, "kind": kind, "order": order, "smoothing": smoothing,
        "ngrams_per_order": (prior.base if kind == "suffix" else prior).ngram_counts(),
        "corpus_tokens": prior.num_tokens if kind == "suffix" else n_tokens,
        **({"beta": list(prior.beta), "beta_table": beta_table} if kind == "suffix" else {}),
        "count_seconds": round(count_seconds, 4), "reused_model": reused,
        "count_tokens_per_second": round(n_tokens / count_seconds) if count_seconds > 0 and not reused else None,
        "topk_shards": shards if cfg.write_topk else 0, "topk_seconds": round(topk_seconds, 4),
        "model_bytes": dir_bytes(model_dir),
        "topk_bytes": dir_bytes(out_dir / "topk") if cfg.write_topk else 0,
        "seconds": round(time.perf_counter() - t0, 4), "out": str(out_dir),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    # what estimate-posterior reads from here, recorded last: a damaged file is named there, never used
    write_checksums(out_dir, [COUNTED_ON, cfg_path.name, "summary.json"])
    return summary


def _shard_bounds(lengths: np.ndarray, rows_per_shard: int) -> list[tuple[int, int]]:
    """Split sequences into consecutive groups of about `rows_per_shard` rows (whole sequences only)."""
    ends = np.cumsum(lengths)
    bounds, lo = [], 0
    while lo < len(lengths):
        start_rows = ends[lo - 1] if lo else 0
        hi = int(np.searchsorted(ends, start_rows + rows_per_shard, side="right"))
        hi = max(hi, lo + 1)
        bounds.append((lo, hi))
        lo = hi
    return bounds
