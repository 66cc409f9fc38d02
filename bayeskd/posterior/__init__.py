"""The posterior: prior x proxy (x revealed log-probabilities) at every response position.

evidence.py (revealed top-k -> student-token evidence rows), proxy.py (`ProxyPosterior`: the proxy teacher-forced,
the posterior pass), shards.py (prior rows and per-rank shard writing), sampled.py (sampled targets), calibrate.py
(choosing the combination from the teacher's own tokens), estimate.py (the `estimate-posterior` job). The math they
run sits below the stages in `bayeskd.core`: the combination rules (`bayeskd.core.combine`, whose function `combine`
is also `bayeskd.combine`), conditioning (`bayeskd.core.condition`), the adaptive mixture and its fit
(`bayeskd.core.adaptive`), the mode names and shard keys (`bayeskd.core.sparse`).
"""
from typing import TYPE_CHECKING

from bayeskd._lazy import lazy_exports

_LAZY = {
    "bayeskd.posterior.evidence": ("Evidence", "evidence_rows"),
    "bayeskd.posterior.proxy": ("ProxyPosterior", "fast_topk"),
    "bayeskd.posterior.shards": ("PriorTopK", "record_shard_bounds"),
    "bayeskd.posterior.calibrate": ("calibrate_combination", "calibrate_on_records", "token_logprob",
                                    "DEFAULT_CANDIDATES"),
    "bayeskd.posterior.estimate": ("estimate_posterior",),
}
if TYPE_CHECKING:
    from bayeskd.posterior.evidence import Evidence, evidence_rows
    from bayeskd.posterior.proxy import ProxyPosterior, fast_topk
    from bayeskd.posterior.shards import PriorTopK, record_shard_bounds
    from bayeskd.posterior.calibrate import (DEFAULT_CANDIDATES, calibrate_combination, calibrate_on_records,
                                           token_logprob)
    from bayeskd.posterior.estimate import estimate_posterior

__all__ = ["Evidence", "evidence_rows", "ProxyPosterior", "fast_topk", "PriorTopK", "record_shard_bounds",
           "calibrate_combination", "calibrate_on_records", "token_logprob", "DEFAULT_CANDIDATES", "estimate_posterior"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
