"""Top-K sparse distributions (`SparseDist`) and their on-disk shards (safetensors + a JSON manifest). The mode names
and extras keys every stage shares are in `bayeskd.core.names`.

A row lists K (index, log-probability) entries plus the `tail`, the mass of every unlisted token, spread
uniformly over them (see docs/MATH.md). Padding slots have index -1 and log-probability -inf.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from bayeskd.integrity import (CorruptOutputError, MissingOutputError, atomic_save_safetensors, atomic_write_json,
                               file_problem, file_sha256, json_sha256, load_safetensors_bytes, warn_damaged)
from bayeskd.core.names import CODECS

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # raw shards (int32 ids, float log-probs); compact shards (bayeskd.codec) are version 2

NEG_INF = float("-inf")  # the log-probability of a padding slot


class CacheMismatchError(ValueError):
    """A shard directory was made for another tokenizer, vocabulary or config than the one asked for."""


@dataclass
class SparseDist:
    indices: torch.Tensor  # int32 [N, K]; -1 marks padding
    logprobs: torch.Tensor  # float32 or bf16 [N, K]; -inf at padding
    tail: torch.Tensor  # float32 [N]: mass outside the listed entries
    vocab_size: int
    temperature: float = 1.0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row extras, e.g. "context_count" [N]

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, rows) -> "SparseDist":
        return SparseDist(
            self.indices[rows], self.logprobs[rows], self.tail[rows], self.vocab_size, self.temperature,
            {k: v[rows] for k, v in self.extras.items()},
        )

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SparseDist":
        return SparseDist(
            self.indices.to(device), self.logprobs.to(device=device, dtype=dtype or self.logprobs.dtype),
            self.tail.to(device), self.vocab_size, self.temperature, {k: v.to(device) for k, v in self.extras.items()},
        )

    @staticmethod
    def cat(dists: list["SparseDist"]) -> "SparseDist":
        if not dists:
            raise ValueError("SparseDist.cat needs at least one SparseDist")
        first = dists[0]
        for d in dists[1:]:
            if d.vocab_size != first.vocab_size or d.k != first.k:
                raise ValueError(
                    f"cannot concatenate SparseDist with V={d.vocab_size}, K={d.k} onto V={first.vocab_size}, K={first.k}"
                )
        keys = set(first.extras)
        return SparseDist(
            torch.cat([d.indices for d in dists]), torch.cat([d.logprobs for d in dists]),
            torch.cat([d.tail for d in dists]), first.vocab_size, first.temperature,
            {k: torch.cat([d.extras[k] for d in dists]) for k in keys if all(k in d.extras for d in dists)},
        )

    def num_listed(self) -> torch.Tensor:
        """Number of non-padding entries per row, int64 [N]."""
        return (self.indices >= 0).sum(dim=1)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [N, V] probability matrix, the tail spread uniformly over unlisted tokens."""
        n, v = self.num_rows, self.vocab_size
        listed = self.indices >= 0
        unlisted = (v - listed.sum(dim=1)).to(dtype)
        per_token = torch.where(unlisted > 0, self.tail.to(dtype) / unlisted.clamp(min=1), torch.zeros_like(unlisted))
        dense = per_token[:, None].expand(n, v).clone()
        probs = torch.where(listed, self.logprobs.to(dtype).exp(), torch.zeros((), dtype=dtype))
        rows = torch.arange(n)[:, None].expand_as(self.indices)
        dense[rows[listed], self.indices[listed].long()] = probs[listed]
        return dense

    def token_logprob(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p_t(y_t) per row, float64 [N]: the listed log-probability, or the row's uniform tail share."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.indices.device)
        if tokens.shape != (self.num_rows,):
            raise ValueError(f"token_logprob: {tuple(tokens.shape)} tokens for {self.num_rows} rows")
        hit = self.indices.long() == tokens[:, None]
        listed = torch.where(hit, self.logprobs.double(), torch.full((), -math.inf, dtype=torch.float64)).amax(dim=1)
        unlisted = (self.vocab_size - (self.indices >= 0).sum(dim=1)).clamp(min=1).double()
        return torch.where(hit.any(dim=1), listed, self.tail.double().clamp(min=0).log() - unlisted.log())

    def validate(self, name: str = "SparseDist", atol: float = 1e-4) -> "SparseDist":
        """Raise ValueError naming the first problem found; returns self so it can be chained."""
        if self.indices.dim() != 2 or self.logprobs.shape != self.indices.shape:
            raise ValueError(f"{name}: indices {tuple(self.indices.shape)} and logprobs {tuple(self.logprobs.shape)} "
                             "must both be [N, K]")
        if self.tail.shape != (self.num_rows,):
            raise ValueError(f"{name}: tail has shape {tuple(self.tail.shape)}, expected ({self.num_rows},)")
        if self.k > self.vocab_size:
            raise ValueError(f"{name}: K={self.k} is larger than the vocabulary size V={self.vocab_size}")
        if self.indices.dtype != torch.int32:
            raise ValueError(f"{name}: indices must be int32, got {self.indices.dtype}")
        listed = self.indices >= 0
        if (self.indices < -1).any() or (self.indices >= self.vocab_size).any():
            bad = self.indices[(self.indices < -1) | (self.indices >= self.vocab_size)][0].item()
            raise ValueError(f"{name}: token index {bad} outside [0, V={self.vocab_size})")
        lp = self.logprobs.float()
        if torch.isnan(lp).any() or (lp[listed] == float("inf")).any() or not torch.isfinite(self.tail).all():
            raise ValueError(f"{name}: NaN or infinite values in logprobs or tail")
        if (lp[~listed] != float("-inf")).any():
            raise ValueError(f"{name}: padding slots (index -1) must have logprob -inf")
        if (lp[listed] > atol).any():
            raise ValueError(f"{name}: a listed log-probability is above 0")
        if (self.tail < -atol).any():
            raise ValueError(f"{name}: negative tail mass")
        mass = torch.where(listed, lp.exp(), torch.zeros(())).sum(dim=1) + self.tail.float()
        if (mass > 1 + atol).any():
            row = int(torch.argmax(mass))
            raise ValueError(f"{name}: row {row} has total mass {mass[row].item():.6f} > 1")
        if ((listed.sum(dim=1) == self.vocab_size) & (self.tail > atol)).any():
            raise ValueError(f"{name}: a row lists all V tokens but has tail mass > 0 (nowhere to put it)")
        srt = torch.sort(torch.where(listed, self.indices, -torch.arange(1, self.k + 1, dtype=torch.int32)[None]), 1)[0]
        if (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError(f"{name}: a row lists the same token index twice")
        return self


def by_probability(indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Each row's column order [N, K]: descending probability, ties (and listed entries at -inf) in their order,
    padding last. One stable sort of -logprobs with padding as NaN, which sorts after everything."""
    return (-logprobs).masked_fill(indices < 0, float("nan")).sort(dim=1, stable=True).indices


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), so caches made with another tokenizer are refused."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else dict(tokenizer)
    payload = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


def dir_bytes(path: Path) -> int:
    """Bytes of every file below `path` (0 when it does not exist): the size a job reports it wrote."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


class ShardWriter:
    """Writes SparseDist shards into `out_dir` with a manifest rewritten (atomically) after every shard.

    Re-opening a directory whose manifest matches (V, K, tokenizer, config) resumes it: finished shards are
    kept and `has_shard` tells the caller which to skip. A manifest that does not match is refused.
    """

    def __init__(self, out_dir: str | os.PathLike, vocab_size: int, k: int, tokenizer_fingerprint: str,
                 config: dict[str, Any] | None = None, manifest_name: str = MANIFEST, codec: str = "raw"):
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        self.dir = Path(out_dir)
        self.manifest_name = manifest_name  # data-parallel writers each keep their own, merged afterwards
        self.codec = codec
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = {
            "format": "bayeskd.sparse", "version": FORMAT_VERSION, "vocab_size": int(vocab_size), "k": int(k),
            "tokenizer_fingerprint": tokenizer_fingerprint, "config": config or {}, "shards": {},
        }
        if codec != "raw":  # raw manifests stay as version 1 wrote them
            self.manifest.update(version=2, codec=codec)
        path = self.dir / MANIFEST
        if path.exists():
            old = read_manifest(self.dir)
            check_manifest(old, self.dir, vocab_size=vocab_size, k=k,
                           tokenizer_fingerprint=tokenizer_fingerprint, config=config or {})
            if old.get("codec", "raw") != codec:
                raise CacheMismatchError(f"{self.dir}: shards written with codec {old.get('codec', 'raw')!r}, asked "
                                         f"for {codec!r}; use the same --codec or a new output directory")
            self.manifest["shards"] = self.intact(old["shards"])

    def intact(self, shards: dict[str, Any]) -> dict[str, Any]:
        """The finished shards of a resumed run that are still as written (present, size and sha256 as listed);
        a damaged one is named in a warning and left out, so it is written again rather than trusted."""

        kept = {}
        for n, info in shards.items():
            problem = file_problem(self.dir / n, info) if (self.dir / n).exists() else "missing"
            if problem is None:
                kept[n] = info
            elif problem != "missing":  # a missing shard was never finished (or removed on purpose): no warning
                warn_damaged(self.dir / n, problem, "it will be written again")
        return kept

    def has_shard(self, name: str) -> bool:
        return f"{name}.safetensors" in self.manifest["shards"]

    def write(self, name: str, dist: SparseDist, extra: dict[str, torch.Tensor] | None = None) -> Path:
        if dist.vocab_size != self.manifest["vocab_size"] or dist.k != self.manifest["k"]:
            raise ValueError(f"shard {name}: V={dist.vocab_size}, K={dist.k} does not match the manifest's "
                             f"V={self.manifest['vocab_size']}, K={self.manifest['k']}")
        params = None
        if self.codec == "compact":
            from bayeskd.codec import encode

            # the codec stores each row's curve in descending order, padding last (also after a listed entry at
            # -inf, a revealed probability of 0, which ties with padding in value)
            lp = dist.logprobs.float()
            order = by_probability(dist.indices, lp)
            tensors, params = encode(dist.indices.gather(1, order), lp.gather(1, order), dist.tail, dist.vocab_size)
        else:
            tensors = {"indices": dist.indices, "logprobs": dist.logprobs, "tail": dist.tail}
        tensors.update({f"extras.{k}": v for k, v in dist.extras.items()})
        tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
        fname = f"{name}.safetensors"
        path = self.dir / fname
        atomic_save_safetensors(tensors, path, metadata={"temperature": str(dist.temperature)})
        self.manifest["shards"][fname] = {"rows": dist.num_rows, "sha256": file_sha256(path),
                                          "bytes": path.stat().st_size, **({"codec": params} if params else {})}
        write_manifest(self.dir / self.manifest_name, self.manifest)
        return path


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write a manifest with the sha256 of its own content, so a flipped digit (in V, K or a checksum) that still
    parses as JSON is caught on reading."""

    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    atomic_write_json(path, {**body, "manifest_sha256": json_sha256(body)})


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:

    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{shard_dir}: no {MANIFEST}; not a bayeskd shard directory (or its manifest "
                                "was deleted: missing)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptOutputError(path, f"manifest is not valid JSON ({e}): truncated or damaged") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "bayeskd.sparse":
        raise ValueError(f"{path}: not a bayeskd sparse-shard manifest")
    want = manifest.get("manifest_sha256")  # absent in manifests written before it existed
    if want is not None and want != json_sha256({k: v for k, v in manifest.items() if k != "manifest_sha256"}):
        raise CorruptOutputError(path, "checksum mismatch: the manifest's content differs from its recorded "
                                 "sha256 (damaged)")
    return manifest


def check_manifest(manifest: dict[str, Any], where: Any, *, vocab_size: int | None = None, k: int | None = None,
                   tokenizer_fingerprint: str | None = None, config: dict[str, Any] | None = None) -> None:
    if tokenizer_fingerprint is not None and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise CacheMismatchError(
            f"{where}: made with another tokenizer (fingerprint {manifest['tokenizer_fingerprint'][:12]}…, "
            f"expected {tokenizer_fingerprint[:12]}…); refusing to reuse it. Use a new output directory.")
    if vocab_size is not None and manifest["vocab_size"] != vocab_size:
        raise CacheMismatchError(f"{where}: vocabulary size {manifest['vocab_size']}, expected {vocab_size}")
    if k is not None and manifest["k"] != k:
        raise CacheMismatchError(f"{where}: made with K={manifest['k']}, expected K={k}")
    if config is not None and manifest["config"] != json.loads(json.dumps(config)):
        diff = "; ".join(config_differences(manifest["config"], json.loads(json.dumps(config))))
        raise CacheMismatchError(f"{where}: made with another config ({diff}); refusing to reuse it")


def config_differences(stored: Any, now: Any, where: str = "", limit: int = 4) -> list[str]:
    """Where two JSON configs differ, as "key.path: stored X, now Y" (the first `limit`), down to the leaf values:
    a refusal names the setting, also when it is one float deep inside a nested setting."""
    if isinstance(stored, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(now), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in stored or key not in now:
                out.append(f"{path}: {'only now' if key in now else 'only stored'}")
            elif stored[key] != now[key]:
                out += config_differences(stored[key], now[key], path, limit)
            if len(out) >= limit:
                break
        return out[:limit]
    if isinstance(stored, list) and isinstance(now, list) and len(stored) == len(now):
        out = []
        for i, (a, b) in enumerate(zip(stored, now)):
            if a != b:
                out += config_differences(a, b, f"{where}[{i}]", limit)
            if len(out) >= limit:
                break
        return out[:limit]
    return [f"{where or 'config'}: stored {json.dumps(stored)[:80]}, now {json.dumps(now)[:80]}"]


class ShardReader:
    """Reads a shard directory, verifying the manifest (and, on request, each shard's checksum)."""

    def __init__(self, shard_dir: str | os.PathLike, *, vocab_size: int | None = None, k: int | None = None,
                 tokenizer_fingerprint: str | None = None, config: dict[str, Any] | None = None,
                 verify: bool = True):
        self.dir = Path(shard_dir)
        self.manifest = read_manifest(self.dir)
        check_manifest(self.manifest, self.dir, vocab_size=vocab_size, k=k,
                       tokenizer_fingerprint=tokenizer_fingerprint, config=config)
        self.verify = verify

    @property
    def shard_names(self) -> list[str]:
        return sorted(self.manifest["shards"])  # writers zero-pad shard numbers, so this is write order

    def read(self, fname: str) -> tuple[SparseDist, dict[str, torch.Tensor]]:

        path = self.dir / fname
        info = self.manifest["shards"][fname]
        try:
            data = path.read_bytes()  # read once: the checksum and the tensors come from the same bytes
        except FileNotFoundError:
            raise MissingOutputError(path, "listed in the manifest but missing (deleted?)") from None
        if info.get("bytes") is not None and len(data) != info["bytes"]:  # absent in older manifests
            raise CorruptOutputError(path, f"size is {len(data)} bytes, the manifest says {info['bytes']} "
                                     "(truncated or damaged)")
        if self.verify and hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CorruptOutputError(path, "checksum mismatch: checksum does not match the manifest (file changed "
                                     "or corrupted)")
        t = load_safetensors_bytes(data, path)
        temperature = float(t.pop("__metadata__").get("temperature", 1.0))
        extras = {k[len("extras."):]: v for k, v in t.items() if k.startswith("extras.")}
        extra = {k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")}
        if "codec" in info:  # a compact shard (bayeskd.codec); raw shards hold the tensors themselves
            from bayeskd.codec import decode

            try:
                indices, logprobs, tail = decode(t, info["codec"])
            except (ValueError, KeyError) as e:
                raise CorruptOutputError(path, f"compact shard cannot be decoded ({e}): damaged") from None
        else:
            indices, logprobs, tail = t["indices"], t["logprobs"], t["tail"]
        dist = SparseDist(indices, logprobs, tail, self.manifest["vocab_size"], temperature, extras)
        return dist, extra

    def __iter__(self) -> Iterator[tuple[SparseDist, dict[str, torch.Tensor]]]:
        for name in self.shard_names:
            yield self.read(name)
