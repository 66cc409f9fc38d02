"""Posterior estimation with a proxy model: p ∝ combine(p0 (n-gram prior), q (proxy LM)) at every response
position, written as top-K SparseDist shards (see docs/MATH.md and `bayeskd.core.combine`).

`ProxyPosterior` runs a causal LM (the proxy) teacher-forced over prompt+response and keeps, for each
response token at position p, the proxy's next-token distribution from the logits at p-1 as a top-K
SparseDist; `estimate` combines it with the prior's top-K rows shard by shard (whole records per shard, like
`bayeskd.priors.estimate`), resumably. Without a prior it writes the proxy's own top-K rows (proxy-only
targets, for Proxy-KD), optionally with the proxy's log-probability of each teacher token (`TEACHER_LOGPROB`).
A background worker takes the top-K of each proxy batch, the prior rows, the combination and the writing
while the proxy runs; the shards do not depend on it.
"""
from __future__ import annotations

import inspect
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bayeskd.core.adaptive import Theta, adaptive_settings
from bayeskd.core.combine import combine
from bayeskd.core.condition import apply_evidence
from bayeskd.posterior.sampled import sample_targets
from bayeskd.posterior.shards import (PriorTopK, RankShardWriter, barrier, gather, init_distributed,
                                      rank_manifest_name, record_shard_bounds)
from bayeskd.core.sparse import MANIFEST, CacheMismatchError, SparseDist, read_manifest
from bayeskd.core.names import EVIDENCE_MODES, LENGTHS, MODES, RECORD_INDEX, TEACHER_LOGPROB
from bayeskd.integrity import atomic_write_json
from bayeskd.teacher_forcing import RecordBatch, model_logits, record_batches, target_row_layout

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


class ProxyPosterior:
    """A proxy causal LM and the settings of its combination with the prior (see `bayeskd.core.combine`)."""

    def __init__(self, proxy, *, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
                 batch_size: int = 8, mode: str = "log_linear", a: float = 1.0, b: float = 1.0, c: float = 1.0,
                 w: float = 0.5, evidence: float = 0.0, top_k: int = 64, proxy_top_k: int | None = None,
                 theta: Theta | None = None, window: int | None = None):
        """`window`: read records longer than this many tokens (the proxy's context) in sliding windows
        (`teacher_forcing.record_batches`); None: every record whole."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        # mode "adaptive": `theta` = fit_adaptive's settings, kept as plain JSON (they go into the config)
        self.theta = adaptive_settings(theta) if mode == "adaptive" else None
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if proxy_top_k is not None and (not isinstance(proxy_top_k, (int, np.integer)) or proxy_top_k < 1):
            raise ValueError(f"proxy_top_k must be a positive integer, got {proxy_top_k!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.window = window
        self.dtype = _torch_dtype(dtype)
        if device is None:
            # one GPU per process under torchrun
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if isinstance(proxy, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            p = Path(proxy)
            if not p.exists() and str(proxy).startswith((".", "/", "~")):
                raise FileNotFoundError(f"{proxy}: proxy model directory does not exist")
            try:
                model = AutoModelForCausalLM.from_pretrained(str(proxy), dtype=self.dtype)
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"{proxy}: cannot load a causal LM ({type(e).__name__}: {e})") from e
            self.name = str(proxy)
        else:
            model = proxy.to(self.dtype)
            self.name = str(getattr(proxy, "name_or_path", "") or type(proxy).__name__)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.batch_size = int(batch_size)
        self.mode, self.a, self.b, self.c, self.w = mode, float(a), float(b), float(c), float(w)
        self.evidence = float(evidence)
        self.top_k, self.proxy_top_k = int(top_k), (int(proxy_top_k) if proxy_top_k is not None else None)
        try:
            self._keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            self._keep_arg = False

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        cfg = {"proxy": self.name, "dtype": str(self.dtype).replace("torch.", ""), "mode": self.mode,
               "a": self.a, "b": self.b, "c": self.c, "w": self.w, "evidence": self.evidence,
               "top_k": self.top_k, "proxy_top_k": self.proxy_top_k}
        if self.theta is not None:  # only then: other modes' configs (and resumable directories) stay as they were
            cfg["theta"] = self.theta
        if self.window is not None:  # (likewise)
            cfg["window"] = self.window
        return cfg

    def logits_width(self) -> int:
        emb = self.model.get_output_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return int(emb.weight.shape[0])
        return int(self.model.config.vocab_size)

    def check_vocab(self, vocab_size: int) -> None:
        width = self.logits_width()
        if width < vocab_size:
            raise ValueError(f"proxy {self.name}: its logits have {width} entries, fewer than the tokenizer/prior "
                             f"vocabulary of {vocab_size} tokens; the proxy must share the student tokenizer")

    # ------------------------------------------------------------------ proxy forward
    def _logits_at(self, rb: RecordBatch) -> torch.Tensor:
        """Proxy logits [M, W] at the rows of the batch. The output embedding runs from the batch's `keep_from`
        on (`logits_to_keep`, the shortest prompt), over the whole batch: its matmul keeps the shape of earlier
        versions, so the shards stay bit-identical (a matmul over the selected rows alone gives other bits for
        small batches on CPU)."""
        start = rb.keep_from if self._keep_arg else 0
        logits = model_logits(self.model, rb.input_ids.to(self.device), rb.attention_mask.to(self.device),
                              keep_from=start)
        return logits[rb.batch_index.to(self.device), rb.position.to(self.device) - start]

    def proxy_topk(self, tokenized, indices, vocab_size: int | None = None, *, teacher_logprob: bool = False,
                   top_k: int | None = None) -> SparseDist:
        """Proxy next-token top-K rows at every response position of the records `indices` (rows in the order of
        `indices`, positions in order), over the first `vocab_size` ids (default: the tokenizer's), renormalised.

        K = `top_k`, else `proxy_top_k`, else the posterior's `top_k`. With `teacher_logprob`, extras
        ["proxy_teacher_logprob"] (float32 [N]) holds the proxy's log q(teacher token | context) from the full
        softmax (0.0 at a response token with no context)."""
        return self._proxy_rows(tokenized, indices, vocab_size, teacher_logprob, top_k, None)[0]

    @torch.no_grad()
    def _proxy_rows(self, tokenized, indices, vocab_size: int | None, teacher_logprob: bool, top_k: int | None,
                    pool: ThreadPoolExecutor | None, fill=None) -> tuple[SparseDist, list[Future]]:
        """`proxy_topk`; with `pool` (one worker, first in first out) the top-K of each batch is taken there while
        the next batch runs through the proxy: the rows are complete once the returned futures are done. `fill`
        replaces `_fill_proxy_rows` (estimate passes a timed one)."""
        fill = fill or _fill_proxy_rows
        V = int(vocab_size if vocab_size is not None else tokenized.vocab_size)
        self.check_vocab(V)
        K = min(top_k or self.proxy_top_k or self.top_k, V)
        _, _, offsets = target_row_layout(tokenized, indices)
        N = int(offsets[-1])
        out = SparseDist(torch.full((N, K), -1, dtype=torch.int32), torch.full((N, K), float("-inf")),
                         torch.ones(N), V)  # a row without context stays uniform, tail 1
        if teacher_logprob:
            out.extras[TEACHER_LOGPROB] = torch.zeros(N)
        futures: list[Future] = []
        for rb in record_batches(tokenized, indices, self.batch_size, max_length=self.window):
            logits = self._logits_at(rb)
            if logits.shape[-1] < V:
                raise ValueError(f"proxy {self.name}: logits width {logits.shape[-1]} is smaller than the "
                                 f"vocabulary size {V}")
            y_t = rb.tokens() if teacher_logprob else None
            if pool is None:
                fill(out, rb.target_row, logits, V, K, y_t)
            else:
                if len(futures) >= 2:  # at most two batches of logits wait for the worker (memory)
                    futures[-2].result()
                futures.append(pool.submit(fill, out, rb.target_row, logits, V, K, y_t))
        return out, futures

    # ------------------------------------------------------------------ posterior rows
    def posterior_rows(self, tokenized, indices, prior=None, *, leave_one_out: bool = True,
                       teacher_logprob: bool | None = None) -> SparseDist:
        """The rows one shard holds for the records `indices`: the posterior (or, with `prior=None`, the proxy's
        own top-K rows), with the teacher-token log-probability extra when `teacher_logprob` (default: only
        without a prior)."""
        tlp = prior is None if teacher_logprob is None else bool(teacher_logprob)
        all_seqs, all_prompts = tokenized.response_sequences(), tokenized.prompt_sequences()
        seqs = [all_seqs[int(i)] for i in indices]
        V = int(prior.vocab_size) if prior is not None else int(tokenized.vocab_size)
        prompts = [all_prompts[int(i)] for i in indices]
        prior_rows = (prior.topk(seqs, self.top_k, leave_one_out=leave_one_out, contexts=prompts)
                      if prior is not None else None)
        proxy_rows = self.proxy_topk(tokenized, indices, V, teacher_logprob=tlp,
                                     top_k=self.top_k if prior is None else None)
        return self._combine(prior_rows, proxy_rows, seqs)

    def _combine(self, prior_rows: SparseDist | None, proxy_rows: SparseDist, seqs) -> SparseDist:
        teacher = None
        if self.evidence > 0:
            teacher = torch.from_numpy(np.concatenate(seqs).astype(np.int64)) if len(seqs) else \
                torch.empty(0, dtype=torch.int64)
        extras = {k: v for k, v in proxy_rows.extras.items() if k == TEACHER_LOGPROB}
        if prior_rows is None:  # proxy-only targets; evidence adds the teacher token as with a prior
            post = proxy_rows if self.evidence <= 0 else combine(
                SparseDist(proxy_rows.indices, proxy_rows.logprobs, proxy_rows.tail, proxy_rows.vocab_size),
                None, teacher_tokens=teacher, evidence=self.evidence, top_k=self.top_k)
        else:
            post = combine(prior_rows, proxy_rows, self.mode, a=self.a, b=self.b, c=self.c, w=self.w,
                           teacher_tokens=teacher, evidence=self.evidence, top_k=self.top_k, theta=self.theta)
        return SparseDist(post.indices, post.logprobs, post.tail, post.vocab_size, post.temperature, extras)

    def estimate(self, tokenized, prior=None, out_dir=None, *, leave_one_out: bool = True, shard_records: int = 256,
                 tokenizer_fingerprint: str | None = None, max_shards: int | None = None, progress: bool = True,
                 teacher_logprob: bool | None = None, prior_topk: str | os.PathLike | None = None,
                 overlap: bool = True, evidence=None, evidence_mode: str = "condition",
                 evidence_top_k: int | None = None, codec: str = "raw", samples: int | None = None,
                 keep_top: int = 0, sample_seed: int = 0) -> dict[str, Any]:
        """Write the target rows of every response position of `tokenized` into `out_dir` as SparseDist shards of
        `shard_records` whole records (extras `record_index`, `lengths`), skipping shards already finished
        (resume). `max_shards` stops after writing that many new shards (for tests/partial runs). Returns (and
        writes `out_dir/summary.json`) a summary.

        prior: an `NGramPrior` (posterior targets) or None (proxy-only targets, mode "proxy" in the config).
        teacher_logprob: store the per-row extra "proxy_teacher_logprob" (default: True without a prior).
        prior_topk: a directory of the prior's top-K shards (`estimate-prior --write-topk`) made with the same
        K, leave-one-out setting, tokenizer and records: its rows are read instead of recomputed.
        overlap: take the proxy top-K, the prior top-K, the combination and the shard writing on a background
        thread while the proxy runs (the shards are the same either way).
        evidence: `bayeskd.posterior.evidence.Evidence` rows (target-row order, all records) of what the teacher
        revealed; at rows that have some, the combination is conditioned on it (`evidence_mode` "condition", or
        the baselines "evidence_only": the revealed entries and a uniform tail). `evidence_top_k` is recorded in
        the config (the rows given must already be cut to it).
        codec: "raw" or "compact" shards (`bayeskd.codec`). samples: write sampled targets instead of the top-K
        (`bayeskd.posterior.sampled`: `keep_top` largest entries exactly plus `samples` draws from the rest of the
        top_k posterior and its tail; seeded per shard by `sample_seed`, so a resumed run draws the same)."""
        t0 = time.perf_counter()
        if out_dir is None:
            raise ValueError("estimate needs out_dir")
        V = int(prior.vocab_size) if prior is not None else int(tokenized.vocab_size)
        if V != int(tokenized.vocab_size):
            raise ValueError(f"the prior's vocabulary ({V} tokens) differs from the tokenizer's "
                             f"({tokenized.vocab_size} tokens); estimate the prior with the same tokenizer")
        if self.top_k > V:
            raise ValueError(f"top_k={self.top_k} is larger than the vocabulary size V={V}")
        if prior is None and self.proxy_top_k not in (None, self.top_k):
            raise ValueError(f"proxy_top_k={self.proxy_top_k} applies to combining with a prior; proxy-only "
                             f"targets keep the proxy's top_k={self.top_k} entries")
        fp = tokenized.fingerprint
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != fp:
            raise CacheMismatchError(f"tokenizer fingerprint {tokenizer_fingerprint[:12]}… does not match the "
                                     f"tokenized data's {fp[:12]}…")
        self.check_vocab(V)
        tlp = prior is None if teacher_logprob is None else bool(teacher_logprob)
        out = Path(out_dir)
        if prior is None:
            config = {**self.config(), "mode": "proxy", "prior": None, "leave_one_out": None}
        else:
            config = {**self.config(), "prior": prior.config(), "leave_one_out": bool(leave_one_out)}
        config.update({"shard_records": int(shard_records), "teacher_logprob": tlp})
        if samples is not None:
            if samples < 1 or not 0 <= keep_top <= self.top_k:
                raise ValueError(f"sampled targets need samples >= 1 and 0 <= keep_top <= top_k, got {samples}, "
                                 f"{keep_top}")
            config["target"] = {"kind": "sampled", "samples": int(samples), "keep_top": int(keep_top),
                                "seed": int(sample_seed)}
        if evidence is not None:
            if evidence_mode not in EVIDENCE_MODES:
                raise ValueError(f"evidence_mode must be one of {EVIDENCE_MODES}, got {evidence_mode!r}")
            rows = sum(len(x) for x in tokenized.response_sequences())
            if evidence.num_rows != rows:
                raise ValueError(f"evidence has {evidence.num_rows} rows, the data {rows} response tokens")
            config["evidence"] = {"mode": evidence_mode, "top_k": evidence_top_k}
        source = None
        if prior is not None:
            source = PriorTopK(prior, self.top_k, bool(leave_one_out), tokenized, prior_topk)
        self.codec = codec
        rank, world, created = init_distributed()
        try:
            return self._estimate(tokenized, source, out, config, V, fp, shard_records, max_shards, progress, rank,
                                  world, t0, tlp, overlap, evidence, evidence_mode)
        finally:
            if created:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _estimate(self, tokenized, source: "PriorTopK | None", out: Path, config, V, fp, shard_records, max_shards,
                  progress, rank: int, world: int, t0: float, tlp: bool, overlap: bool, evidence=None,
                  evidence_mode: str = "condition") -> dict[str, Any]:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        barrier(world)
        target = config.get("target")
        writer = RankShardWriter(out, V, self.top_k if target is None else target["keep_top"] + target["samples"],
                                 fp, config, MANIFEST if world == 1 else rank_manifest_name(rank), codec=self.codec)
        seqs = tokenized.response_sequences()
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        row_at = np.concatenate([[0], np.cumsum(lengths)])  # first target row of each record
        bounds = record_shard_bounds(len(seqs), shard_records)
        times = {"prior": 0.0, "proxy": 0.0, "topk": 0.0, "comb": 0.0, "write": 0.0}
        counts = {"written": 0, "skipped": 0, "rows_written": 0}
        mine = [i for i in range(len(bounds)) if i % world == rank]
        todo = [i for i in mine if not writer.has_shard(f"shard-{i:05d}")]
        counts["skipped"] = len(mine) - len(todo)
        if max_shards is not None:
            todo = todo[:max_shards]

        def timed(key, fn, *args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key] += time.perf_counter() - t

        def prior_rows(i):
            return None if source is None else timed("prior", source.rows, *bounds[i])

        def finish(i, prior_rows, proxy):
            lo, hi = bounds[i]
            if isinstance(prior_rows, Future):
                prior_rows = prior_rows.result()
            proxy_rows, fills = proxy
            for f in fills:  # done before this job (one worker, in order); raises what a batch raised
                f.result()
            post = timed("comb", self._combine, prior_rows, proxy_rows, seqs[lo:hi])
            if evidence is not None:
                post = timed("comb", apply_evidence, post, evidence[int(row_at[lo]):int(row_at[hi])], evidence_mode,
                             self.top_k)
            if target is not None:  # seeded per shard: a resumed run draws what an undisturbed one does
                gen = torch.Generator().manual_seed(target["seed"] * 1_000_003 + i)
                post = timed("comb", sample_targets, post, target["samples"], target["keep_top"], gen)
            timed("write", writer.write, f"shard-{i:05d}", post,
                  extra={RECORD_INDEX: torch.arange(lo, hi, dtype=torch.int64),
                         LENGTHS: torch.from_numpy(lengths[lo:hi])})
            counts["written"] += 1
            counts["rows_written"] += post.num_rows

        proxy_k = self.top_k if source is None else None
        bar = tqdm(total=len(todo), desc="posterior shards" + (f" (rank {rank}/{world})" if world > 1 else ""),
                   unit="shard", disable=not progress or rank != 0)
        # One worker thread, first in first out: the prior rows of the next shard, the proxy top-K of each batch
        # and the combination + write of each shard run there while this thread feeds the proxy.
        with _background_worker(overlap) as pool:
            pending: list[Future] = []
            prior_next = pool.submit(prior_rows, todo[0]) if pool and todo else None
            for n, i in enumerate(todo):
                lo, hi = bounds[i]
                prior_now = prior_next if pool else prior_rows(i)
                if pool and n + 1 < len(todo):
                    prior_next = pool.submit(prior_rows, todo[n + 1])
                proxy_rows = timed("proxy", self._proxy_rows, tokenized, range(lo, hi), V, tlp, proxy_k, pool,
                                   lambda *a: timed("topk", _fill_proxy_rows, *a))
                if pool is None:
                    finish(i, prior_now, proxy_rows)
                    bar.update(1)
                    continue
                pending.append(pool.submit(finish, i, prior_now, proxy_rows))
                while len(pending) > 1:  # at most two shards in flight (memory)
                    pending.pop(0).result()
                    bar.update(1)
            for f in pending:
                f.result()
                bar.update(1)
        bar.close()
        stats = gather({**counts, **{f"t_{k}": v for k, v in times.items()}}, world)
        barrier(world)  # every rank's shards and manifest are on disk
        if rank == 0:
            writer.merge_manifests()
        barrier(world)  # the merged manifest is on disk
        if rank != 0:
            writer.manifest = read_manifest(out)
        written = sum(s["written"] for s in stats)
        rows_written = sum(s["rows_written"] for s in stats)
        rows = int(lengths.sum())
        done = sum(1 for i in range(len(bounds)) if writer.has_shard(f"shard-{i:05d}"))
        # the shards and manifest only: not the output lock (its size varies with pid and time) nor a summary an
        # earlier run left, so a resumed run reports the bytes an undisturbed one does
        total_bytes = sum(f.stat().st_size for f in [*Path(out).glob("shard-*.safetensors"), Path(out) / MANIFEST]
                          if f.is_file())
        seconds = time.perf_counter() - t0
        summary = {
            "out": str(out), "records": len(seqs), "rows": rows, "shards": len(bounds), "shards_done": done,
            "shards_written": written, "shards_skipped": sum(s["skipped"] for s in stats),
            "complete": done == len(bounds), "world_size": world,
            "vocab_size": V, **config, "tokenizer_fingerprint": fp,
            "prior_rows": None if source is None else source.how,
            # seconds summed over ranks; with overlap the parts run at the same time, so they add up to more
            # than `seconds`. proxy_forward_seconds: the proxy batches, without their top-K
            # (proxy_topk_seconds: log-softmax, top-K, teacher log-prob)
            "prior_topk_seconds": round(sum(s["t_prior"] for s in stats), 4),
            "proxy_forward_seconds": round(sum(s["t_proxy"] - (0 if overlap else s["t_topk"]) for s in stats), 4),
            "proxy_topk_seconds": round(sum(s["t_topk"] for s in stats), 4),
            "combine_seconds": round(sum(s["t_comb"] for s in stats), 4),
            "write_seconds": round(sum(s["t_write"] for s in stats), 4), "overlap": bool(overlap),
            "seconds": round(seconds, 4),
            "bytes": total_bytes, "bytes_per_token": round(total_bytes / rows, 2) if rows else None,
            "rows_per_second": round(rows_written / seconds) if written else None,
        }
        if rank == 0:
            atomic_write_json(out / "summary.json", summary)
        barrier(world)
        return summary


def _fill_proxy_rows(out: SparseDist, o_t: torch.Tensor, logits: torch.Tensor, V: int, K: int,
                     y_t: torch.Tensor | None) -> None:
    """Write the top-K rows (and teacher-token log-probabilities) of the logits [M, >=V] into `out` at rows o_t."""
    lp = torch.log_softmax(logits[:, :V].float(), dim=-1)
    del logits
    values, idx = fast_topk(lp, K)
    if y_t is not None:
        out.extras[TEACHER_LOGPROB][o_t] = lp.gather(1, y_t.to(lp.device)[:, None])[:, 0].float().cpu()
    del lp
    if K == V:
        tail = torch.zeros(values.shape[0])
    else:
        tail = (-torch.expm1(torch.logsumexp(values.double(), dim=-1))).clamp(min=0.0)
    out.indices[o_t] = idx.to(torch.int32).cpu()
    out.logprobs[o_t] = values.cpu()
    out.tail[o_t] = tail.float().cpu()


def fast_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k, dim=-1)` (largest first) of the rows of a 2-D tensor: the same values, and the same
    indices except where values tie. On CPU, when k is small next to the row, only k·8 candidates are ranked:
    the columns are split into groups of 8 (column j, j + G, ..., j + 7G); the k groups with the largest maxima
    hold k entries >= the k-th largest group maximum m, so the k-th largest entry is >= m, and every entry of
    another group is <= m (at most a tie). torch.topk on CPU copies and heaps every entry of the row."""
    n, width = x.shape
    g = width // _GROUP
    if x.device.type != "cpu" or k * _GROUP * 2 > width:
        return torch.topk(x, k, dim=-1)
    head = x[:, :g * _GROUP].view(n, _GROUP, g)
    groups = head.amax(dim=1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    cand = (groups[:, None, :] + torch.arange(_GROUP)[None, :, None] * g).reshape(n, k * _GROUP)
    if width > g * _GROUP:  # the last width % 8 columns are always candidates
        cand = torch.cat([cand, torch.arange(g * _GROUP, width).expand(n, -1)], dim=1)
    values, pos = x.gather(1, cand).topk(k, dim=-1)
    return values, cand.gather(1, pos)


_GROUP = 8


@contextmanager
def _background_worker(enabled: bool = True):
    """One worker thread (first in, first out) for `estimate`, or None. Its torch ops use one intra-op thread
    (OpenMP keeps the count per calling thread), so it and the proxy's thread team do not oversubscribe the
    cores; the process-wide default is restored afterwards."""
    if not enabled:
        yield None
        return
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(1, thread_name_prefix="bayeskd-posterior",
                              initializer=torch.set_num_threads if threads > 1 else None,
                              initargs=(1,) if threads > 1 else ())
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
