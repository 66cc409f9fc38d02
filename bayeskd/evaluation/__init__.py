"""Scoring against a readable teacher: metrics.py (KL, top-1, coverage of an estimate) and evaluate.py (the
`evaluate` job: target shards and students on teacher text). The job function is `bayeskd.evaluate`;
`bayeskd.evaluation.evaluate` is its module."""
from typing import TYPE_CHECKING

from bayeskd._lazy import lazy_exports

_LAZY = {
    "bayeskd.evaluation.metrics": ("kl_teacher_to_estimate", "top1_match", "topk_mass_coverage", "smoothed_one_hot",
                                   "summarize"),
    "bayeskd.evaluation.evaluate": ("response_logprobs", "student_metrics", "estimate_metrics", "estimation_table"),
}
if TYPE_CHECKING:
    from bayeskd.evaluation.metrics import (kl_teacher_to_estimate, smoothed_one_hot, summarize, top1_match,
                                            topk_mass_coverage)
    from bayeskd.evaluation.evaluate import estimate_metrics, estimation_table, response_logprobs, student_metrics

__all__ = ["kl_teacher_to_estimate", "top1_match", "topk_mass_coverage", "smoothed_one_hot", "summarize",
           "response_logprobs", "student_metrics", "estimate_metrics", "estimation_table"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
