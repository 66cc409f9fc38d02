"""Priors over the next token from the teacher's own generations: base.py (the Prior protocol, `load_prior`),
ngram.py (the n-gram prior, with counting.py and topk.py), suffix.py (the suffix prior, with _suffix_query.py),
estimate.py (the `estimate-prior` job)."""
from typing import TYPE_CHECKING

from bayeskd._lazy import lazy_exports
from bayeskd.priors.base import Prior, load_prior
from bayeskd.priors.ngram import NGramPrior

# the job writes shards and reads the embedded corpus: loaded on first use
_LAZY = {"bayeskd.priors.estimate": ("estimate_prior",)}
if TYPE_CHECKING:
    from bayeskd.priors.estimate import estimate_prior

__all__ = ["Prior", "load_prior", "NGramPrior", "estimate_prior"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
