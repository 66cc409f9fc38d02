"""Deprecated path: moved to bayeskd.priors.ngram (with bayeskd.priors.counting and bayeskd.priors.topk)."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.priors.ngram", "bayeskd.priors.topk", "bayeskd.priors.counting")
