"""Deprecated path: moved to bayeskd.posterior.calibrate."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.posterior.calibrate")
