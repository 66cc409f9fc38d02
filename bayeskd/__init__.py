"""bayeskd: Bayesian estimation of a black-box LLM teacher's token distributions, and distillation from them."""
from bayeskd.corpus import embedded_corpus, embedded_teacher_jsonl, train_bpe_tokenizer
from bayeskd.data import DataError, TokenizedData, load_teacher_records, load_tokenizer, tokenize_records
from bayeskd.evaluation.metrics import kl_teacher_to_estimate, smoothed_one_hot, top1_match, topk_mass_coverage
from bayeskd.linear_losses import fused_linear_ce, fused_linear_kd_and_ce, fused_linear_posterior_kd
from bayeskd.losses import TARGET_FLOOR, fused_posterior_kd, sparse_kd_loss
from bayeskd.posterior.combine import combine
from bayeskd.priors import NGramPrior, Prior, load_prior
from bayeskd.priors.estimate import estimate_prior
from bayeskd.teachers.base import Teacher
from bayeskd.integrity import CorruptOutputError
from bayeskd.sparse import CacheMismatchError, ShardReader, ShardWriter, SparseDist, tokenizer_fingerprint

__all__ = [
    "SparseDist", "ShardWriter", "ShardReader", "CacheMismatchError", "tokenizer_fingerprint",
    "DataError", "TokenizedData", "load_teacher_records", "load_tokenizer", "tokenize_records",
    "embedded_corpus", "embedded_teacher_jsonl", "train_bpe_tokenizer",
    "Prior", "load_prior", "NGramPrior", "estimate_prior", "Teacher", "ProxyPosterior", "estimate_posterior",
    "BayesKDConfig", "BayesKDTrainer", "BayesKDCollator", "TeacherTargetsDataset", "distill",
    "kl_teacher_to_estimate", "top1_match", "topk_mass_coverage", "smoothed_one_hot",
    "build_lab", "BlackBoxTeacher", "WhiteBoxTeacher", "sample_teacher_jsonl",
    "TARGET_FLOOR", "combine", "sparse_kd_loss", "fused_posterior_kd", "fused_linear_posterior_kd",
    "fused_linear_kd_and_ce", "fused_linear_ce",
    "run_lab", "LabRunConfig", "evaluate", "response_logprobs", "student_metrics",
    "GADConfig", "gad", "Discriminator", "bradley_terry_loss", "discriminator_accuracy", "group_advantages",
    "grpo_loss",
    "align_proxy", "proxy_preference_loss", "proxy_kd_weights", "alignment_diagnostics", "top1_match_ratio",
    "topk_mass_share", "calibrate_combination", "fit_adaptive", "sample_targets", "CorruptOutputError",
]
__version__ = "0.1.0"

# The trainer and the posterior import transformers' Trainer and model classes (seconds): load them on first use
# so `import bayeskd` and the CLI's --help stay fast.
_LAZY = {name: "bayeskd.posterior.proxy" for name in ("ProxyPosterior",)}
_LAZY.update({name: "bayeskd.posterior.estimate" for name in ("estimate_posterior",)})
_LAZY.update({name: "bayeskd.lab.build" for name in ("build_lab",)})
_LAZY.update({name: "bayeskd.teachers.local" for name in ("BlackBoxTeacher", "WhiteBoxTeacher")})
_LAZY.update({name: "bayeskd.teachers.sampling" for name in ("sample_teacher_jsonl",)})
_LAZY.update({name: "bayeskd.lab.run" for name in ("run_lab", "LabRunConfig")})
_LAZY.update({name: "bayeskd.evaluation.evaluate" for name in ("evaluate", "response_logprobs", "student_metrics")})
_LAZY.update({name: "bayeskd.distill.gad" for name in ("GADConfig", "gad", "Discriminator", "bradley_terry_loss",
                                                       "discriminator_accuracy", "group_advantages", "grpo_loss")})
_LAZY.update({name: "bayeskd.distill.proxy_kd" for name in ("align_proxy", "proxy_preference_loss",
                                                            "alignment_diagnostics", "top1_match_ratio",
                                                            "topk_mass_share")})
_LAZY.update({name: "bayeskd.posterior.calibrate" for name in ("calibrate_combination",)})
_LAZY.update({name: "bayeskd.posterior.adaptive" for name in ("fit_adaptive",)})
_LAZY.update({name: "bayeskd.posterior.sampled" for name in ("sample_targets",)})
_LAZY.update({name: "bayeskd.distill.trainer" for name in ("BayesKDConfig", "BayesKDTrainer", "distill")})
_LAZY.update({name: "bayeskd.distill.targets" for name in ("BayesKDCollator", "TeacherTargetsDataset",
                                                           "proxy_kd_weights")})

def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bayeskd' has no attribute {name!r}")
