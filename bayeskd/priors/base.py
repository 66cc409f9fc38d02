"""The Prior protocol: what the posterior needs from a prior, whichever statistics it is built from.

A prior answers, for every position of a token sequence, the top-K next-token distribution with its tail mass
(`topk`, a SparseDist whose per-row extras carry what the prior knows about the context, e.g. "context_count"),
and can be saved and loaded. `load_prior` opens any saved prior by the `format` its config.json names, so the
posterior jobs never name a prior class.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from bayeskd.integrity import RECORD, verify_checksums
from bayeskd.core.sparse import SparseDist


@runtime_checkable
class Prior(Protocol):
    vocab_size: int

    def topk(self, sequences: Any, k: int, leave_one_out: bool = False, contexts: Any = None) -> SparseDist:
        """Row t of each sequence: the distribution of token t given the tokens before it; rows concatenated.
        leave_one_out: the position's own occurrence is not counted (the prior is queried on its own corpus).
        contexts: the prompt before each sequence (a prior may use it; an n-gram does not)."""

    def prob(self, context: Sequence[int]) -> np.ndarray:
        """The full next-token distribution [V] after `context`."""

    def config(self) -> dict[str, Any]:
        """The settings that define the prior (written into every manifest made from it)."""

    def save(self, path: str | os.PathLike) -> None:
        """Write the prior into the directory `path` (config.json names its `format`)."""


def _loaders() -> dict[str, Callable[[Path], Prior]]:
    from bayeskd.priors.ngram import NGramPrior
    from bayeskd.priors.suffix import SuffixPrior

    return {"bayeskd.ngram_prior": NGramPrior.load, "bayeskd.suffix_prior": SuffixPrior.load}


def load_prior(path: str | os.PathLike) -> Prior:
    """A saved prior: `path` itself, or `path/prior` (an `estimate-prior` output directory)."""
    d = Path(path)
    if (d / "prior").is_dir():
        d = d / "prior"
    config = d / "config.json"
    # first: a damaged or deleted config.json is named as such, not as an unknown format or "not a prior"
    if (d / RECORD).exists():
        verify_checksums(d, hint=f"the prior is damaged; count it again (remove {d} and rerun estimate-prior)")
    if not config.exists():
        raise FileNotFoundError(f"{d}: no config.json; not a saved prior")
    try:
        fmt = json.loads(config.read_text()).get("format")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from e
    loaders = _loaders()
    if fmt not in loaders:
        raise ValueError(f"{config}: unknown prior format {fmt!r} (known: {', '.join(sorted(loaders))})")
    return loaders[fmt](d)
