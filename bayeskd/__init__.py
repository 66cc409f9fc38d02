"""bayeskd: Bayesian estimation of a black-box LLM teacher's token distributions, and distillation from them.

`__all__` is the library's API: data in, teachers, priors, the posterior, targets, losses, the trainer, the jobs
behind the CLI and the lab. Everything else (the parts of a job, its losses and diagnostics) is imported from its
own module, e.g. `bayeskd.distillation.gad_parts.grpo_loss`.
"""
from typing import TYPE_CHECKING

from bayeskd._lazy import lazy_exports

# Every name is loaded on first use: the library's modules import torch, and the jobs transformers and TRL (seconds),
# so `import bayeskd`, the CLI's --help and a job's first moments (when a SIGTERM must already stop it cleanly) stay
# light.
_LAZY = {
    "bayeskd.corpus": ("embedded_corpus", "embedded_teacher_jsonl", "train_bpe_tokenizer"),
    "bayeskd.data": ("DataError", "TokenizedData", "load_teacher_records", "load_tokenizer", "tokenize_records"),
    "bayeskd.evaluation.metrics": ("kl_teacher_to_estimate", "top1_match", "topk_mass_coverage"),
    "bayeskd.losses.linear": ("fused_linear_ce", "fused_linear_kd_and_ce", "fused_linear_posterior_kd"),
    "bayeskd.losses.divergences": ("sparse_kd_loss",),
    "bayeskd.losses.fused": ("fused_posterior_kd",),
    "bayeskd.core.combine": ("combine",),
    "bayeskd.priors": ("NGramPrior", "Prior", "load_prior"),
    "bayeskd.priors.estimate": ("EstimatePriorConfig", "estimate_prior"),
    "bayeskd.teachers.base": ("Teacher",),
    "bayeskd.integrity": ("CorruptOutputError",),
    "bayeskd.core.sparse": ("CacheMismatchError", "ShardReader", "ShardWriter", "SparseDist", "tokenizer_fingerprint"),
    "bayeskd.teachers.local": ("BlackBoxTeacher", "WhiteBoxTeacher"),
    "bayeskd.teachers.sampling": ("sample_teacher_jsonl",),
    "bayeskd.teachers.generate": ("GenerateConfig", "generate"),
    "bayeskd.teachers.score": ("ScoreConfig", "score"),
    "bayeskd.posterior.calibrate": ("calibrate_combination",),
    "bayeskd.posterior.proxy": ("ProxyPosterior",),
    "bayeskd.posterior.sampled": ("sample_targets",),
    "bayeskd.posterior.estimate": ("EstimatePosteriorConfig", "estimate_posterior"),
    "bayeskd.distillation.targets": ("TeacherTargetsDataset", "BayesKDCollator"),
    "bayeskd.distillation.trainer": ("BayesKDConfig", "BayesKDTrainer", "distill"),
    "bayeskd.distillation.align_proxy": ("AlignProxyConfig", "align_proxy"),
    "bayeskd.distillation.gad": ("GADConfig", "gad"),
    "bayeskd.evaluation.evaluate": ("EvaluateConfig", "evaluate"),
    "bayeskd.lab.build": ("build_lab",),
    "bayeskd.lab.run": ("run_lab", "LabRunConfig"),
}
if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from bayeskd.corpus import embedded_corpus, embedded_teacher_jsonl, train_bpe_tokenizer
    from bayeskd.data import DataError, TokenizedData, load_teacher_records, load_tokenizer, tokenize_records
    from bayeskd.evaluation.metrics import kl_teacher_to_estimate, top1_match, topk_mass_coverage
    from bayeskd.losses.linear import fused_linear_ce, fused_linear_kd_and_ce, fused_linear_posterior_kd
    from bayeskd.losses.divergences import sparse_kd_loss
    from bayeskd.losses.fused import fused_posterior_kd
    from bayeskd.core.combine import combine
    from bayeskd.priors import NGramPrior, Prior, load_prior
    from bayeskd.priors.estimate import EstimatePriorConfig, estimate_prior
    from bayeskd.teachers.base import Teacher
    from bayeskd.integrity import CorruptOutputError
    from bayeskd.core.sparse import CacheMismatchError, ShardReader, ShardWriter, SparseDist, tokenizer_fingerprint
    from bayeskd.teachers.local import BlackBoxTeacher, WhiteBoxTeacher
    from bayeskd.teachers.sampling import sample_teacher_jsonl
    from bayeskd.teachers.generate import GenerateConfig, generate
    from bayeskd.teachers.score import ScoreConfig, score
    from bayeskd.posterior.calibrate import calibrate_combination
    from bayeskd.posterior.proxy import ProxyPosterior
    from bayeskd.posterior.sampled import sample_targets
    from bayeskd.posterior.estimate import EstimatePosteriorConfig, estimate_posterior
    from bayeskd.distillation.targets import BayesKDCollator, TeacherTargetsDataset
    from bayeskd.distillation.trainer import BayesKDConfig, BayesKDTrainer, distill
    from bayeskd.distillation.align_proxy import AlignProxyConfig, align_proxy
    from bayeskd.distillation.gad import GADConfig, gad
    from bayeskd.evaluation.evaluate import EvaluateConfig, evaluate
    from bayeskd.lab.build import build_lab
    from bayeskd.lab.run import LabRunConfig, run_lab

__all__ = [
    # teacher records in, tokenized; target shards; the errors a job raises
    "load_teacher_records", "load_tokenizer", "tokenize_records", "TokenizedData", "tokenizer_fingerprint",
    "embedded_corpus", "embedded_teacher_jsonl", "train_bpe_tokenizer",
    "SparseDist", "ShardWriter", "ShardReader", "DataError", "CacheMismatchError", "CorruptOutputError",
    # teachers
    "Teacher", "BlackBoxTeacher", "WhiteBoxTeacher", "sample_teacher_jsonl", "GenerateConfig", "generate",
    "ScoreConfig", "score",
    # priors
    "Prior", "NGramPrior", "load_prior", "EstimatePriorConfig", "estimate_prior",
    # the posterior
    "combine", "calibrate_combination", "ProxyPosterior", "sample_targets", "EstimatePosteriorConfig",
    "estimate_posterior",
    # targets, losses, the trainer
    "TeacherTargetsDataset", "BayesKDCollator", "sparse_kd_loss", "fused_posterior_kd", "fused_linear_posterior_kd",
    "fused_linear_kd_and_ce", "fused_linear_ce", "BayesKDConfig", "BayesKDTrainer", "distill",
    # the other jobs: proxy alignment, GAD, evaluation, and its metrics
    "AlignProxyConfig", "align_proxy", "GADConfig", "gad", "EvaluateConfig", "evaluate", "kl_teacher_to_estimate",
    "top1_match", "topk_mass_coverage",
    # the lab
    "build_lab", "run_lab", "LabRunConfig",
]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
