"""Deprecated path: moved to bayeskd.distill.trainer bayeskd.distill.targets."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.distill.trainer", "bayeskd.distill.targets")
