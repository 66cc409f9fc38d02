"""The posterior: prior x proxy (x revealed log-probabilities) at every response position.

combine.py (the combination math), adaptive.py (mode "adaptive": per-row mixture weights and their fit), proxy.py
(`ProxyPosterior`: the proxy teacher-forced, the posterior pass), shards.py (prior rows and per-rank shard writing),
calibrate.py (choosing the combination from the teacher's own tokens), estimate.py (the `estimate-posterior` job).
"""
from bayeskd._moved import lazy

_NAMES = {"combine": "bayeskd.posterior.combine",
          "evidence_only": "bayeskd.posterior.condition",
          "ProxyPosterior": "bayeskd.posterior.proxy", "fast_topk": "bayeskd.posterior.proxy",
          "PriorTopK": "bayeskd.posterior.shards", "record_shard_bounds": "bayeskd.posterior.shards",
          "calibrate_combination": "bayeskd.posterior.calibrate", "calibrate_on_records": "bayeskd.posterior.calibrate",
          "token_logprob": "bayeskd.posterior.calibrate", "DEFAULT_CANDIDATES": "bayeskd.posterior.calibrate",
          "estimate_posterior": "bayeskd.posterior.estimate",
          "fit_adaptive": "bayeskd.posterior.adaptive", "adaptive_features": "bayeskd.posterior.adaptive",
          "adaptive_weights": "bayeskd.posterior.adaptive",
          "Evidence": "bayeskd.posterior.evidence", "evidence_rows": "bayeskd.posterior.evidence",
          "MODES": "bayeskd.sparse", "TEACHER_LOGPROB": "bayeskd.sparse"}
__all__ = sorted(_NAMES)
__getattr__ = lazy(__name__, _NAMES)
