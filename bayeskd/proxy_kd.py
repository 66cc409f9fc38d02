"""Deprecated path: moved to bayeskd.distill.proxy_kd bayeskd.distill.targets."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.distill.proxy_kd", "bayeskd.distill.targets")
