"""Deprecated path: moved to bayeskd.evaluation.metrics."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.evaluation.metrics")
