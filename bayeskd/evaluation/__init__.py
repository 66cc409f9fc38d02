"""Scoring against a readable teacher: metrics.py (KL, top-1, coverage of an estimate) and evaluate.py (the
`evaluate` job: target shards and students on teacher text)."""
from bayeskd._moved import lazy

_NAMES = {**{n: "bayeskd.evaluation.metrics" for n in ("kl_teacher_to_estimate", "top1_match", "topk_mass_coverage",
                                                       "smoothed_one_hot", "summarize")},
          **{n: "bayeskd.evaluation.evaluate" for n in ("evaluate", "response_logprobs", "student_metrics",
                                                        "estimate_metrics", "estimation_table")}}
__all__ = sorted(_NAMES)
__getattr__ = lazy(__name__, _NAMES)
