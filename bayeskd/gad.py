"""Deprecated path: moved to bayeskd.distill.gad."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.distill.gad")
