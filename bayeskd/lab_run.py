"""Deprecated path: moved to bayeskd.lab.run."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.lab.run")
