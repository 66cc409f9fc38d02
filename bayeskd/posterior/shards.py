"""Shards of the posterior pass: the prior's top-K rows of consecutive records (read from `estimate-prior
--write-topk` shards or computed), and data-parallel writing (one manifest per rank, merged at the end).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from bayeskd.integrity import CorruptOutputError, file_problem
from bayeskd.core.sparse import (MANIFEST, CacheMismatchError, ShardReader, ShardWriter, SparseDist, check_manifest,
                                 read_manifest, write_manifest)
from bayeskd.core.names import LENGTHS, RECORD_INDEX


def record_shard_bounds(num_records: int, shard_records: int) -> list[tuple[int, int]]:
    """Consecutive groups of `shard_records` whole records: [(lo, hi), ...]."""
    if shard_records < 1:
        raise ValueError(f"shard_records must be positive, got {shard_records}")
    return [(lo, min(lo + shard_records, num_records)) for lo in range(0, num_records, shard_records)]


def rank_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else RANK / WORLD_SIZE (default 0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, created): init a gloo group from the environment when WORLD_SIZE > 1 and none exists."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} but torch.distributed is not available in this build")
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return rank, world, False


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def _rank_manifests(out: Path) -> list[Path]:
    return sorted(out.glob("manifest.rank*.json"))


class RankShardWriter(ShardWriter):
    """A `ShardWriter` whose manifest goes to `manifest_name` (one per rank, so ranks never write the same file).

    On opening it knows as finished every shard listed (and present) in the merged `manifest.json` or in any
    per-rank manifest left by an interrupted run, after checking each manifest matches (V, K, tokenizer,
    config). `merge_manifests` folds them all into `manifest.json`.
    """

    def __init__(self, out_dir, vocab_size: int, k: int, tokenizer_fingerprint: str, config: dict[str, Any],
                 manifest_name: str = MANIFEST, codec: str = "raw"):
        # reads and checks the merged manifest.json; writes go to `manifest_name`
        super().__init__(out_dir, vocab_size, k, tokenizer_fingerprint, config, manifest_name=manifest_name,
                         codec=codec)
        for path in _rank_manifests(self.dir):
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # unreadable leftovers: their shards are simply recomputed
            if old.get("format") != "bayeskd.sparse":
                continue
            check_manifest(old, path, vocab_size=vocab_size, k=k, tokenizer_fingerprint=tokenizer_fingerprint,
                           config=config)
            self.manifest["shards"].update(self.intact(old["shards"]))

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
        write_manifest(main, merged)
        for path in ranks:
            path.unlink(missing_ok=True)
        self.manifest = merged
        return merged


class PriorTopK:
    """The prior's top-K rows of consecutive records: read from `estimate-prior --write-topk` shards when they
    were made for the same records, K, leave-one-out setting and tokenizer (they are what `prior.topk` computes),
    otherwise computed with `prior.topk`. `how` says which."""

    def __init__(self, prior, k: int, leave_one_out: bool, tokenized, topk_dir: str | os.PathLike | None = None):
        self.prior, self.k, self.loo = prior, int(k), bool(leave_one_out)
        self.seqs = tokenized.response_sequences()
        self.prompts = tokenized.prompt_sequences()
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
        kind = self.prior.config().get("kind", "ngram")
        if cfg.get("kind", "ngram") != kind:
            raise CacheMismatchError(f"{topk_dir}: prior top-K rows made by a {cfg.get('kind', 'ngram')} prior, "
                                     f"the prior is a {kind} prior")
        for key, val in self.prior.config().items():
            if key in cfg and cfg[key] != val:
                raise CacheMismatchError(f"{topk_dir}: prior top-K rows made with {key}={cfg[key]!r}, the prior "
                                         f"has {val!r}")
        names, starts, lengths = [], [], []
        for name in reader.shard_names:
            # size only here (the checksum is checked when the shard is read): safetensors' own error names no file
            problem = file_problem(topk_dir / name, reader.manifest["shards"][name], checksum=False)
            if problem is not None:
                raise CorruptOutputError(topk_dir / name, problem)
            with safe_open(str(topk_dir / name), "pt") as f:
                starts.append(int(f.get_slice(f"extra.{RECORD_INDEX}")[0:1][0]))
                lengths.append(f.get_tensor(f"extra.{LENGTHS}"))
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
            return self.prior.topk(self.seqs[lo:hi], self.k, leave_one_out=self.loo, contexts=self.prompts[lo:hi])
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
