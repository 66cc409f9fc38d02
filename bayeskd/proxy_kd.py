"""Deprecated path: moved to bayeskd.distill.proxy_kd and bayeskd.distill.targets."""
from bayeskd._moved import alias

alias(__name__, "bayeskd.distill.proxy_kd", "bayeskd.distill.targets",
      renamed={"PROXY_LOGPROB_KEY": ("bayeskd.sparse", "TEACHER_LOGPROB")})
