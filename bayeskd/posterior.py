"""Posterior estimation with a proxy model: p ∝ combine(p0 (n-gram prior), q (proxy LM)) at every response
position, written as top-K SparseDist shards (see docs/MATH.md and `bayeskd.losses.combine`).

`ProxyPosterior` runs a causal LM (the proxy) teacher-forced over prompt+response and keeps, for each
response token at position p, the proxy's next-token distribution from the logits at p-1 as a top-K
SparseDist; `estimate` combines it with the prior's top-K rows shard by shard (whole records per shard, like
`bayeskd.pipeline.estimate_prior`), resumably. Without a prior it writes the proxy's own top-K rows (proxy-only
targets, for Proxy-KD), optionally with the proxy's log-probability of each teacher token (`TEACHER_LOGPROB`).
A background worker takes the top-K of each proxy batch, the prior rows, the combination and the writing
while the proxy runs; the shards do not depend on it.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from bayeskd.losses import combine
from bayeskd.sparse import (MANIFEST, CacheMismatchError, ShardReader, ShardWriter, SparseDist, atomic_write_json,
                            check_manifest, read_manifest)

MODES = ("log_linear", "dirichlet", "mixture")
TEACHER_LOGPROB = "proxy_teacher_logprob"  # per-row shard extra: the proxy's log q(teacher token | context)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


def record_shard_bounds(num_records: int, shard_records: int) -> list[tuple[int, int]]:
    """Consecutive groups of `shard_records` whole records: [(lo, hi), ...]."""
    if shard_records < 1:
        raise ValueError(f"shard_records must be positive, got {shard_records}")
    return [(lo, min(lo + shard_records, num_records)) for lo in range(0, num_records, shard_records)]


def _rank_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else RANK / WORLD_SIZE (default 0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, created): init a gloo group from the environment when WORLD_SIZE > 1 and none exists."""
    import torch.distributed as dist

    rank, world = _rank_world()
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} but torch.distributed is not available in this build")
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return rank, world, False


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def _rank_manifests(out: Path) -> list[Path]:
    return sorted(out.glob("manifest.rank*.json"))


class _RankShardWriter(ShardWriter):
    """A `ShardWriter` whose manifest goes to `manifest_name` (one per rank, so ranks never write the same file).

    On opening it knows as finished every shard listed (and present) in the merged `manifest.json` or in any
    per-rank manifest left by an interrupted run, after checking each manifest matches (V, K, tokenizer,
    config). `merge_manifests` folds them all into `manifest.json`.
    """

    def __init__(self, out_dir, vocab_size: int, k: int, tokenizer_fingerprint: str, config: dict[str, Any],
                 manifest_name: str = MANIFEST):
        # reads and checks the merged manifest.json; writes go to `manifest_name`
        super().__init__(out_dir, vocab_size, k, tokenizer_fingerprint, config, manifest_name=manifest_name)
        for path in _rank_manifests(self.dir):
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # unreadable leftovers: their shards are simply recomputed
            if old.get("format") != "bayeskd.sparse":
                continue
            check_manifest(old, path, vocab_size=vocab_size, k=k, tokenizer_fingerprint=tokenizer_fingerprint,
                           config=config)
            self.manifest["shards"].update({n: s for n, s in old["shards"].items() if (self.dir / n).exists()})

    def merge_manifests(self) -> dict[str, Any]:
        """Fold `manifest.json` and every per-rank manifest into `manifest.json` (schema as ShardWriter writes
        it), remove the per-rank files, and return the merged manifest. Call on one process, after a barrier."""
        merged = {k: v for k, v in self.manifest.items() if k != "shards"}
        shards: dict[str, Any] = {}
        main = self.dir / MANIFEST
        if main.exists():
            shards.update(read_manifest(self.dir)["shards"])
        ranks = _rank_manifests(self.dir)
        for path in ranks:
            try:
                part = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if part.get("format") == "bayeskd.sparse":
                shards.update(part["shards"])
        merged["shards"] = {n: shards[n] for n in sorted(shards) if (self.dir / n).exists()}
        atomic_write_json(main, merged)
        for path in ranks:
            path.unlink(missing_ok=True)
        self.manifest = merged
        return merged


class ProxyPosterior:
    """A proxy causal LM and the settings of its combination with the prior (see `bayeskd.losses.combine`)."""

    def __init__(self, proxy, *, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
                 batch_size: int = 8, mode: str = "log_linear", a: float = 1.0, b: float = 1.0, c: float = 1.0,
                 w: float = 0.5, evidence: float = 0.0, top_k: int = 64, proxy_top_k: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if proxy_top_k is not None and (not isinstance(proxy_top_k, (int, np.integer)) or proxy_top_k < 1):
            raise ValueError(f"proxy_top_k must be a positive integer, got {proxy_top_k!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
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
        return {"proxy": self.name, "dtype": str(self.dtype).replace("torch.", ""), "mode": self.mode,
                "a": self.a, "b": self.b, "c": self.c, "w": self.w, "evidence": self.evidence,
                "top_k": self.top_k, "proxy_top_k": self.proxy_top_k}

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
    def _logits_at(self, ids: torch.Tensor, mask: torch.Tensor, b_t: torch.Tensor, p_t: torch.Tensor,
                   start: int) -> torch.Tensor:
        """Proxy logits [M, W] at the positions (b_t[m], p_t[m]) of the batch. The output embedding runs from the
        position `start` on (`logits_to_keep`, the shortest prompt), over the whole batch: its matmul keeps the
        shape of earlier versions, so the shards stay bit-identical (a matmul over the selected rows alone gives
        other bits for small batches on CPU)."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        start = start if self._keep_arg else 0
        if start > 0:
            kwargs["logits_to_keep"] = int(ids.shape[1] - start)
        return self.model(**kwargs).logits[b_t, p_t - start]

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
        indices = np.asarray([int(i) for i in indices], dtype=np.int64)
        lens_all = np.array([len(tokenized.input_ids[i]) for i in indices], dtype=np.int64)
        plens_all = np.asarray(tokenized.prompt_lengths, dtype=np.int64)[indices]
        offsets = np.concatenate([[0], np.cumsum(lens_all - plens_all)]).astype(np.int64)
        N = int(offsets[-1])
        out = SparseDist(torch.full((N, K), -1, dtype=torch.int32), torch.full((N, K), float("-inf")),
                         torch.ones(N), V)
        if teacher_logprob:
            out.extras[TEACHER_LOGPROB] = torch.zeros(N)
        # positions in `indices`, longest record first (stable: the same batches as sorting the ids)
        order = np.argsort(-lens_all, kind="stable")
        futures: list[Future] = []
        for s in range(0, len(order), self.batch_size):
            batch = order[s:s + self.batch_size]
            lens, plens = lens_all[batch], plens_all[batch]
            # response rows with a context: the token at p >= max(plen, 1) is predicted by the logits at p - 1
            # (a response token at position 0 has no context: its row stays uniform, tail 1)
            first = np.maximum(plens, 1)
            n = np.maximum(lens - first, 0)
            if n.sum() == 0:
                continue
            starts = np.cumsum(n) - n
            ramp = np.arange(int(n.sum())) - np.repeat(starts, n)
            b_t = torch.from_numpy(np.repeat(np.arange(len(batch)), n))
            p_t = torch.from_numpy(np.repeat(first - 1, n) + ramp)
            o_t = torch.from_numpy(np.repeat(offsets[batch] + first - plens, n) + ramp)
            L = int(lens.max())
            ids = torch.zeros((len(batch), L), dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for j, q in enumerate(batch):
                ids[j, :lens[j]] = torch.from_numpy(tokenized.input_ids[indices[q]].astype(np.int64))
                mask[j, :lens[j]] = 1
            logits = self._logits_at(ids.to(self.device), mask.to(self.device), b_t.to(self.device),
                                     p_t.to(self.device), max(int(plens.min()) - 1, 0))
            if logits.shape[-1] < V:
                raise ValueError(f"proxy {self.name}: logits width {logits.shape[-1]} is smaller than the "
                                 f"vocabulary size {V}")
            y_t = ids[b_t, p_t + 1] if teacher_logprob else None
            if pool is None:
                fill(out, o_t, logits, V, K, y_t)
            else:
                if len(futures) >= 2:  # at most two batches of logits wait for the worker (memory)
                    futures[-2].result()
                futures.append(pool.submit(fill, out, o_t, logits, V, K, y_t))
        return out, futures

    # ------------------------------------------------------------------ posterior rows
    def posterior_rows(self, tokenized, indices, prior=None, *, leave_one_out: bool = True,
                       teacher_logprob: bool | None = None) -> SparseDist:
        """The rows one shard holds for the records `indices`: the posterior (or, with `prior=None`, the proxy's
        own top-K rows), with the teacher-token log-probability extra when `teacher_logprob` (default: only
        without a prior)."""
        tlp = prior is None if teacher_logprob is None else bool(teacher_logprob)
        seqs = [tokenized.response_sequences()[int(i)] for i in indices]
        V = int(prior.vocab_size) if prior is not None else int(tokenized.vocab_size)
        prior_rows = prior.topk(seqs, self.top_k, leave_one_out=leave_one_out) if prior is not None else None
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
                           teacher_tokens=teacher, evidence=self.evidence, top_k=self.top_k)
        return SparseDist(post.indices, post.logprobs, post.tail, post.vocab_size, post.temperature, extras)

    def estimate(self, tokenized, prior=None, out_dir=None, *, leave_one_out: bool = True, shard_records: int = 256,
                 tokenizer_fingerprint: str | None = None, max_shards: int | None = None, progress: bool = True,
                 teacher_logprob: bool | None = None, prior_topk: str | os.PathLike | None = None,
                 overlap: bool = True) -> dict[str, Any]:
        """Write the target rows of every response position of `tokenized` into `out_dir` as SparseDist shards of
        `shard_records` whole records (extras `record_index`, `lengths`), skipping shards already finished
        (resume). `max_shards` stops after writing that many new shards (for tests/partial runs). Returns (and
        writes `out_dir/summary.json`) a summary.

        prior: an `NGramPrior` (posterior targets) or None (proxy-only targets, mode "proxy" in the config).
        teacher_logprob: store the per-row extra "proxy_teacher_logprob" (default: True without a prior).
        prior_topk: a directory of the prior's top-K shards (`estimate-prior --write-topk`) made with the same
        K, leave-one-out setting, tokenizer and records: its rows are read instead of recomputed.
        overlap: take the proxy top-K, the prior top-K, the combination and the shard writing on a background
        thread while the proxy runs (the shards are the same either way)."""
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
        source = None
        if prior is not None:
            source = _PriorTopK(prior, self.top_k, bool(leave_one_out), tokenized, prior_topk)
        rank, world, created = _init_distributed()
        try:
            return self._estimate(tokenized, source, out, config, V, fp, shard_records, max_shards, progress, rank,
                                  world, t0, tlp, overlap)
        finally:
            if created:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _estimate(self, tokenized, source: "_PriorTopK | None", out: Path, config, V, fp, shard_records, max_shards,
                  progress, rank: int, world: int, t0: float, tlp: bool, overlap: bool) -> dict[str, Any]:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        _barrier(world)
        writer = _RankShardWriter(out, V, self.top_k, fp, config,
                                  MANIFEST if world == 1 else _rank_manifest_name(rank))
        seqs = tokenized.response_sequences()
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
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
            timed("write", writer.write, f"shard-{i:05d}", post,
                  extra={"record_index": torch.arange(lo, hi, dtype=torch.int64),
                         "lengths": torch.from_numpy(lengths[lo:hi])})
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
        stats = _gather({**counts, **{f"t_{k}": v for k, v in times.items()}}, world)
        _barrier(world)  # every rank's shards and manifest are on disk
        if rank == 0:
            writer.merge_manifests()
        _barrier(world)  # the merged manifest is on disk
        if rank != 0:
            writer.manifest = read_manifest(out)
        written = sum(s["written"] for s in stats)
        rows_written = sum(s["rows_written"] for s in stats)
        rows = int(lengths.sum())
        done = sum(1 for i in range(len(bounds)) if writer.has_shard(f"shard-{i:05d}"))
        total_bytes = _dir_bytes(out)
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
        _barrier(world)
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


class _PriorTopK:
    """The prior's top-K rows of consecutive records: read from `estimate-prior --write-topk` shards when they
    were made for the same records, K, leave-one-out setting and tokenizer (they are what `prior.topk` computes),
    otherwise computed with `prior.topk`. `how` says which."""

    def __init__(self, prior, k: int, leave_one_out: bool, tokenized, topk_dir: str | os.PathLike | None = None):
        self.prior, self.k, self.loo = prior, int(k), bool(leave_one_out)
        self.seqs = tokenized.response_sequences()
        self.how, self.reader, self.starts, self.names, self._cache = "computed", None, None, [], (None, None)
        if topk_dir is not None:
            self._open(Path(topk_dir), tokenized)

    def _open(self, topk_dir: Path, tokenized) -> None:
        reader = ShardReader(topk_dir, vocab_size=self.prior.vocab_size, k=self.k,
                             tokenizer_fingerprint=tokenized.fingerprint)
        cfg = reader.manifest["config"]
        if cfg.get("leave_one_out") != self.loo:
            raise CacheMismatchError(f"{topk_dir}: prior top-K rows made with leave_one_out="
                                     f"{cfg.get('leave_one_out')}, asked for {self.loo}")
        for key, val in self.prior.config().items():
            if key in cfg and cfg[key] != val:
                raise CacheMismatchError(f"{topk_dir}: prior top-K rows made with {key}={cfg[key]!r}, the prior "
                                         f"has {val!r}")
        names, starts, lengths = [], [], []
        for name in reader.shard_names:
            with safe_open(str(topk_dir / name), "pt") as f:
                starts.append(int(f.get_slice("extra.record_index")[0:1][0]))
                lengths.append(f.get_tensor("extra.lengths"))
            names.append(name)
        lengths = torch.cat(lengths).numpy() if lengths else np.zeros(0, np.int64)
        want = np.array([len(s) for s in self.seqs], dtype=np.int64)
        if len(lengths) != len(want) or (lengths != want).any():
            raise CacheMismatchError(f"{topk_dir}: prior top-K rows were made for other records ({len(lengths)} "
                                     f"records) than the {len(want)} records given")
        self.reader, self.names, self.starts, self.how = reader, names, np.array(starts), "read"
        self.row_start = np.concatenate([[0], np.cumsum(want)])

    def rows(self, lo: int, hi: int) -> SparseDist:
        if self.reader is None:
            return self.prior.topk(self.seqs[lo:hi], self.k, leave_one_out=self.loo)
        parts, r = [], lo
        while r < hi:
            s = int(np.searchsorted(self.starts, r, side="right")) - 1
            dist, first = self._shard(s)
            end = min(hi, int(self.starts[s + 1]) if s + 1 < len(self.starts) else hi)
            a, b = self.row_start[r] - self.row_start[first], self.row_start[end] - self.row_start[first]
            parts.append(dist[int(a):int(b)])
            r = end
        return parts[0] if len(parts) == 1 else SparseDist.cat(parts)

    def _shard(self, s: int) -> tuple[SparseDist, int]:
        if self._cache[0] != s:  # consecutive output shards mostly fall in the same prior shard: keep the last
            dist, _ = self.reader.read(self.names[s])
            self._cache = (s, dist)
        return self._cache[1], int(self.starts[s])


def _calibrate(post: ProxyPosterior, prior, tokenized, n_records: int) -> dict[str, Any]:
    """Set `post`'s combination to the one that best explains the teacher tokens of the first `n_records`
    records (prior queried with leave-one-out); returns the scores."""
    from bayeskd.calibrate import calibrate_on_records

    if n_records < 1:
        raise ValueError(f"calibration_records must be >= 1, got {n_records}")
    result = calibrate_on_records(prior, post, tokenized, range(min(n_records, len(tokenized))), post.top_k)
    post.mode = result["best"]["mode"]
    for key in ("a", "b", "c", "w"):
        if key in result["best"]:
            setattr(post, key, float(result["best"][key]))
    return result


def estimate_posterior(data: str | None = None, prior_dir: str | None = None, proxy=None, out: str | None = None,
                       *, tokenizer: str | None = None, top_k: int = 64, proxy_top_k: int | None = None,
                       mode: str = "log_linear", a: float = 1.0, b: float = 1.0, c: float = 1.0, w: float = 0.5,
                       evidence: float = 0.0, batch_size: int = 8, dtype: str = "float32",
                       device: str | None = None, leave_one_out: bool = True, shard_records: int = 256,
                       skip_bad: bool = False, split: str = "train", max_records: int | None = None,
                       max_shards: int | None = None, teacher_logprob: bool | None = None,
                       reuse_prior_topk: bool = True, calibrate: bool = False,
                       calibration_records: int = 256) -> dict[str, Any]:
    """The job behind `bayeskd estimate-posterior`: load the teacher records and the prior saved by
    `estimate_prior` (`prior_dir/prior`, or `prior_dir` itself), tokenize with `tokenizer` (default: the one
    named in `prior_dir/summary.json`), and write posterior shards with the proxy into `out`.

    `prior_dir=None` (or "none"): proxy-only targets (the proxy's own top-K rows, mode "proxy"); then `data` is
    needed and the tokenizer defaults to the proxy's. `teacher_logprob`: store the per-row extra
    "proxy_teacher_logprob" (default: True without a prior). With `reuse_prior_topk`, the prior's top-K rows
    are read from `prior_dir/topk` (`estimate-prior --write-topk`) when it was made with the same K,
    leave-one-out setting and records, instead of being recomputed (the shards are the same).
    `calibrate`: choose mode and a/b/c/w (replacing the given ones) by the likelihood of the teacher's own tokens
    on the first `calibration_records` records (`bayeskd.calibrate`); the choice is in the summary and manifest."""
    from bayeskd.data import DataError, load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.prior import NGramPrior

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
        psummary = json.loads((pdir / "summary.json").read_text()) if (pdir / "summary.json").exists() else {}
        if (pdir / "prior_config.json").exists():
            pconfig = json.loads((pdir / "prior_config.json").read_text())
        tokenizer = tokenizer or psummary.get("tokenizer")
        if tokenizer is None:
            raise DataError(f"{prior_dir}: no summary.json naming the tokenizer; pass --tokenizer")
        data = data or psummary.get("data") or pconfig.get("data")
        if data is None:
            raise DataError(f"{prior_dir}: no summary.json naming the data; pass --data")
        prior = NGramPrior.load(pdir / "prior" if (pdir / "prior").is_dir() else pdir)
    else:
        if data is None:
            raise DataError("proxy-only targets (no --prior) need --data")
        if tokenizer is None:
            if not isinstance(proxy, (str, os.PathLike)):
                raise DataError("proxy-only targets with an in-memory proxy need --tokenizer")
            tokenizer = str(proxy)  # the proxy shares the student tokenizer; its checkpoint usually carries it
    tok = load_tokenizer(tokenizer)
    records, report = load_teacher_records(data, split=split, skip_bad=skip_bad)
    if max_records is not None:
        records = records[:max_records]
    tokenized = tokenize_records(records, tok)
    want = pconfig.get("tokenizer_fingerprint")
    if want is not None and want != tokenized.fingerprint:
        raise CacheMismatchError(f"{prior_dir}: the prior was estimated with another tokenizer (fingerprint "
                                 f"{want[:12]}…, {tokenizer} has {tokenized.fingerprint[:12]}…)")
    post = ProxyPosterior(proxy, dtype=dtype, device=device, batch_size=batch_size, mode=mode, a=a, b=b, c=c, w=w,
                          evidence=evidence, top_k=top_k, proxy_top_k=proxy_top_k)
    calibration = None
    if calibrate:
        if prior is None:
            raise ValueError("calibrate chooses how to combine prior and proxy: it needs a prior")
        calibration = _calibrate(post, prior, tokenized, calibration_records)
    prior_topk = None
    if prior is not None and reuse_prior_topk and (pdir / "topk" / MANIFEST).exists():
        topk_manifest = read_manifest(pdir / "topk")
        if (topk_manifest["k"] == top_k and topk_manifest["config"].get("leave_one_out") == bool(leave_one_out)
                and sum(sh["rows"] for sh in topk_manifest["shards"].values())
                == sum(len(x) for x in tokenized.response_sequences())):  # complete, for these records
            prior_topk = pdir / "topk"  # other mismatches (tokenizer, lengths) are refused with a clear error
    summary = post.estimate(tokenized, prior, out, leave_one_out=leave_one_out, shard_records=shard_records,
                            max_shards=max_shards, teacher_logprob=teacher_logprob, prior_topk=prior_topk)
    if calibration is not None:
        summary["calibration"] = calibration
    summary.update({"data": str(data), "tokenizer": str(tokenizer),
                    "prior_dir": None if prior_dir is None else str(prior_dir),
                    "skipped_records": int(report.skipped)})
    if _rank_world()[0] == 0:
        atomic_write_json(Path(out) / "summary.json", summary)
    return summary
