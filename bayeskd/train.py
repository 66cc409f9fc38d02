"""Deprecated path: moved to bayeskd.distill.trainer and bayeskd.distill.targets."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.distill.trainer", "bayeskd.distill.targets",
      renamed={"POSTERIOR_MODES": ("bayeskd.sparse", "MODES")})
