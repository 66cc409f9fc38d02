"""Posterior estimation with a proxy model: p ∝ combine(p0 (n-gram prior), q (proxy LM)) at every response
position, written as top-K SparseDist shards (see docs/MATH.md and `bayeskd.losses.combine`).

`ProxyPosterior` runs a causal LM (the proxy) teacher-forced over prompt+response and keeps, for each
response token at position p, the proxy's next-token distribution from the logits at p-1 as a top-K
SparseDist; `estimate` combines it with the prior's top-K rows shard by shard (whole records per shard, like
`bayeskd.pipeline.estimate_prior`), resumably.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bayeskd.losses import combine
from bayeskd.sparse import (MANIFEST, CacheMismatchError, ShardWriter, SparseDist, atomic_write_json, check_manifest,
                            read_manifest)

MODES = ("log_linear", "dirichlet", "mixture")
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
    @torch.no_grad()
    def proxy_topk(self, tokenized, indices, vocab_size: int | None = None) -> SparseDist:
        """Proxy next-token top-K rows at every response position of the records `indices` (rows in the order of
        `indices`, positions in order), over the first `vocab_size` ids (default: the tokenizer's), renormalised."""
        V = int(vocab_size if vocab_size is not None else tokenized.vocab_size)
        self.check_vocab(V)
        K = min(self.proxy_top_k or self.top_k, V)
        indices = [int(i) for i in indices]
        lens_all = [len(tokenized.input_ids[i]) for i in indices]
        plens_all = [int(tokenized.prompt_lengths[i]) for i in indices]
        counts = [l - p for l, p in zip(lens_all, plens_all)]
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]) if counts else np.zeros(1, np.int64)
        N = int(offsets[-1])
        out_idx = torch.full((N, K), -1, dtype=torch.int32)
        out_lp = torch.full((N, K), float("-inf"))
        out_tail = torch.ones(N)
        # positions in `indices`, longest record first (stable: the same batches as sorting the ids)
        order = sorted(range(len(indices)), key=lambda q: -lens_all[q])
        for s in range(0, len(order), self.batch_size):
            batch = order[s:s + self.batch_size]
            lens = [lens_all[q] for q in batch]
            plens = [plens_all[q] for q in batch]
            L = max(lens)
            ids = torch.zeros((len(batch), L), dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for j, q in enumerate(batch):
                ids[j, :lens[j]] = torch.from_numpy(tokenized.input_ids[indices[q]].astype(np.int64))
                mask[j, :lens[j]] = 1
            # logits needed at positions p-1 for p >= prompt length (>= 1): from min(plen)-1 on
            start = max(min(plens) - 1, 0)
            kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "use_cache": False}
            if self._keep_arg and start > 0:
                kwargs["logits_to_keep"] = L - start
                offset = start
            else:
                offset = 0
            logits = self.model(**kwargs).logits  # [B, L - offset, W]
            if logits.shape[-1] < V:
                raise ValueError(f"proxy {self.name}: logits width {logits.shape[-1]} is smaller than the "
                                 f"vocabulary size {V}")
            # every response row of the batch: (batch row, logits position) -> output row
            bsel, psel, osel = [], [], []
            for j, q in enumerate(batch):
                first = 1 if plens[j] == 0 else 0  # no context for the first response token: uniform (tail 1)
                n = lens[j] - plens[j]
                if n > first:
                    bsel.append(np.full(n - first, j, dtype=np.int64))
                    psel.append(np.arange(plens[j] + first - 1 - offset, lens[j] - 1 - offset, dtype=np.int64))
                    osel.append(np.arange(offsets[q] + first, offsets[q] + n, dtype=np.int64))
            if bsel:
                b_t = torch.from_numpy(np.concatenate(bsel)).to(logits.device)
                p_t = torch.from_numpy(np.concatenate(psel)).to(logits.device)
                o_t = torch.from_numpy(np.concatenate(osel))
                lg = logits[:, :, :V][b_t, p_t].float()  # [M, V]
                lp = torch.log_softmax(lg, dim=-1)
                del lg
                top = torch.topk(lp, K, dim=-1)
                del lp
                if K == V:
                    tail = torch.zeros(top.values.shape[0])
                else:
                    tail = (-torch.expm1(torch.logsumexp(top.values.double(), dim=-1))).clamp(min=0.0)
                out_idx[o_t] = top.indices.to(torch.int32).cpu()
                out_lp[o_t] = top.values.cpu()
                out_tail[o_t] = tail.float().cpu()
            del logits
        return SparseDist(out_idx, out_lp, out_tail, V)

    # ------------------------------------------------------------------ posterior rows
    def posterior_rows(self, tokenized, indices, prior, *, leave_one_out: bool = True) -> SparseDist:
        """The combined posterior rows for the records `indices` (what one shard holds)."""
        seqs = [tokenized.response_sequences()[int(i)] for i in indices]
        prior_rows = prior.topk(seqs, self.top_k, leave_one_out=leave_one_out)
        proxy_rows = self.proxy_topk(tokenized, indices, prior.vocab_size)
        return self._combine(prior_rows, proxy_rows, seqs)

    def _combine(self, prior_rows: SparseDist, proxy_rows: SparseDist, seqs) -> SparseDist:
        teacher = None
        if self.evidence > 0:
            teacher = torch.from_numpy(np.concatenate(seqs).astype(np.int64)) if len(seqs) else \
                torch.empty(0, dtype=torch.int64)
        return combine(prior_rows, proxy_rows, self.mode, a=self.a, b=self.b, c=self.c, w=self.w,
                       teacher_tokens=teacher, evidence=self.evidence, top_k=self.top_k)

    def estimate(self, tokenized, prior, out_dir, *, leave_one_out: bool = True, shard_records: int = 256,
                 tokenizer_fingerprint: str | None = None, max_shards: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
        """Write the posterior top-K rows of every response position of `tokenized` into `out_dir` as
        SparseDist shards of `shard_records` whole records (extras `record_index`, `lengths`), skipping shards
        already finished (resume). `max_shards` stops after writing that many new shards (for tests/partial
        runs). Returns (and writes `out_dir/summary.json`) a summary."""
        t0 = time.perf_counter()
        V = int(prior.vocab_size)
        if V != int(tokenized.vocab_size):
            raise ValueError(f"the prior's vocabulary ({V} tokens) differs from the tokenizer's "
                             f"({tokenized.vocab_size} tokens); estimate the prior with the same tokenizer")
        if self.top_k > V:
            raise ValueError(f"top_k={self.top_k} is larger than the vocabulary size V={V}")
        fp = tokenized.fingerprint
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != fp:
            raise CacheMismatchError(f"tokenizer fingerprint {tokenizer_fingerprint[:12]}… does not match the "
                                     f"tokenized data's {fp[:12]}…")
        self.check_vocab(V)
        out = Path(out_dir)
        config = {**self.config(), "prior": prior.config(), "leave_one_out": bool(leave_one_out),
                  "shard_records": int(shard_records)}
        rank, world, created = _init_distributed()
        try:
            return self._estimate(tokenized, prior, out, config, V, fp, leave_one_out, shard_records, max_shards,
                                  progress, rank, world, t0)
        finally:
            if created:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _estimate(self, tokenized, prior, out: Path, config, V, fp, leave_one_out, shard_records, max_shards,
                  progress, rank: int, world: int, t0: float) -> dict[str, Any]:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        _barrier(world)
        writer = _RankShardWriter(out, V, self.top_k, fp, config,
                                  MANIFEST if world == 1 else _rank_manifest_name(rank))
        seqs = tokenized.response_sequences()
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        bounds = record_shard_bounds(len(seqs), shard_records)
        t_prior = t_proxy = t_comb = 0.0
        written = skipped = 0
        rows_written = 0
        mine = [i for i in range(len(bounds)) if i % world == rank]
        for i in tqdm(mine, desc="posterior shards" + (f" (rank {rank}/{world})" if world > 1 else ""),
                      unit="shard", disable=not progress or rank != 0):
            lo, hi = bounds[i]
            name = f"shard-{i:05d}"
            if writer.has_shard(name):
                skipped += 1
                continue
            if max_shards is not None and written >= max_shards:
                break
            t = time.perf_counter()
            prior_rows = prior.topk(seqs[lo:hi], self.top_k, leave_one_out=leave_one_out)
            t_prior += time.perf_counter() - t
            t = time.perf_counter()
            proxy_rows = self.proxy_topk(tokenized, range(lo, hi), V)
            t_proxy += time.perf_counter() - t
            t = time.perf_counter()
            post = self._combine(prior_rows, proxy_rows, seqs[lo:hi])
            t_comb += time.perf_counter() - t
            writer.write(name, post, extra={"record_index": torch.arange(lo, hi, dtype=torch.int64),
                                            "lengths": torch.from_numpy(lengths[lo:hi])})
            written += 1
            rows_written += post.num_rows
        stats = _gather({"written": written, "skipped": skipped, "rows_written": rows_written, "t_prior": t_prior,
                         "t_proxy": t_proxy, "t_comb": t_comb}, world)
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
            # seconds summed over ranks
            "prior_topk_seconds": round(sum(s["t_prior"] for s in stats), 4),
            "proxy_forward_seconds": round(sum(s["t_proxy"] for s in stats), 4),
            "combine_seconds": round(sum(s["t_comb"] for s in stats), 4), "seconds": round(seconds, 4),
            "bytes": total_bytes, "bytes_per_token": round(total_bytes / rows, 2) if rows else None,
            "rows_per_second": round(rows_written / seconds) if written else None,
        }
        if rank == 0:
            atomic_write_json(out / "summary.json", summary)
        _barrier(world)
        return summary


def estimate_posterior(data: str | None = None, prior_dir: str | None = None, proxy=None, out: str | None = None,
                       *, tokenizer: str | None = None, top_k: int = 64, proxy_top_k: int | None = None,
                       mode: str = "log_linear", a: float = 1.0, b: float = 1.0, c: float = 1.0, w: float = 0.5,
                       evidence: float = 0.0, batch_size: int = 8, dtype: str = "float32",
                       device: str | None = None, leave_one_out: bool = True, shard_records: int = 256,
                       skip_bad: bool = False, split: str = "train", max_records: int | None = None,
                       max_shards: int | None = None) -> dict[str, Any]:
    """The job behind `bayeskd estimate-posterior`: load the teacher records and the prior saved by
    `estimate_prior` (`prior_dir/prior`, or `prior_dir` itself), tokenize with `tokenizer` (default: the one
    named in `prior_dir/summary.json`), and write posterior shards with the proxy into `out`."""
    from bayeskd.data import DataError, load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.prior import NGramPrior

    if prior_dir is None or proxy is None or out is None:
        raise ValueError("estimate_posterior needs prior_dir, proxy and out")
    pdir = Path(prior_dir)
    if not pdir.exists():
        raise FileNotFoundError(f"{prior_dir}: prior directory does not exist")
    psummary = json.loads((pdir / "summary.json").read_text()) if (pdir / "summary.json").exists() else {}
    pconfig = json.loads((pdir / "prior_config.json").read_text()) if (pdir / "prior_config.json").exists() else {}
    tokenizer = tokenizer or psummary.get("tokenizer")
    if tokenizer is None:
        raise DataError(f"{prior_dir}: no summary.json naming the tokenizer; pass --tokenizer")
    data = data or psummary.get("data") or pconfig.get("data")
    if data is None:
        raise DataError(f"{prior_dir}: no summary.json naming the data; pass --data")
    prior = NGramPrior.load(pdir / "prior" if (pdir / "prior").is_dir() else pdir)
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
    summary = post.estimate(tokenized, prior, out, leave_one_out=leave_one_out, shard_records=shard_records,
                            max_shards=max_shards)
    summary.update({"data": str(data), "tokenizer": str(tokenizer), "prior_dir": str(prior_dir),
                    "skipped_records": int(report.skipped)})
    if _rank_world()[0] == 0:
        atomic_write_json(Path(out) / "summary.json", summary)
    return summary
