"""Deprecated path: moved to bayeskd.priors.ngram."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.priors.ngram")
