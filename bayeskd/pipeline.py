"""Deprecated path: moved to bayeskd.priors.estimate."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.priors.estimate")
