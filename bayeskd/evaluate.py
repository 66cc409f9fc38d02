"""Deprecated path: moved to bayeskd.evaluation.evaluate."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.evaluation.evaluate")
