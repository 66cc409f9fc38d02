"""Priors over the next token from the teacher's own generations: the Prior protocol, the n-gram prior and the
`estimate-prior` job."""
from bayeskd._moved import lazy
from bayeskd.priors.base import Prior, load_prior
from bayeskd.priors.ngram import NGramPrior

__all__ = ["Prior", "load_prior", "NGramPrior", "estimate_prior"]
__getattr__ = lazy(__name__, {"estimate_prior": "bayeskd.priors.estimate"})
