"""bayeskd: Bayesian estimation of a black-box LLM teacher's token distributions, and distillation from them."""
from bayeskd.corpus import embedded_corpus, embedded_teacher_jsonl, train_bpe_tokenizer
from bayeskd.data import DataError, TokenizedData, load_teacher_records, load_tokenizer, tokenize_records
from bayeskd.eval import kl_teacher_to_estimate, smoothed_one_hot, top1_match, topk_mass_coverage
from bayeskd.losses import TARGET_FLOOR, combine, fused_posterior_kd, sparse_kd_loss
from bayeskd.pipeline import estimate_prior
from bayeskd.prior import NGramPrior
from bayeskd.sparse import CacheMismatchError, ShardReader, ShardWriter, SparseDist, tokenizer_fingerprint

__all__ = [
    "SparseDist", "ShardWriter", "ShardReader", "CacheMismatchError", "tokenizer_fingerprint",
    "DataError", "TokenizedData", "load_teacher_records", "load_tokenizer", "tokenize_records",
    "embedded_corpus", "embedded_teacher_jsonl", "train_bpe_tokenizer",
    "NGramPrior", "estimate_prior", "ProxyPosterior", "estimate_posterior",
    "BayesKDConfig", "BayesKDTrainer", "BayesKDCollator", "TeacherTargetsDataset", "distill",
    "kl_teacher_to_estimate", "top1_match", "topk_mass_coverage", "smoothed_one_hot",
    "build_lab", "BlackBoxTeacher", "WhiteBoxTeacher", "sample_teacher_jsonl",
    "TARGET_FLOOR", "combine", "sparse_kd_loss", "fused_posterior_kd",
    "run_lab", "LabRunConfig", "evaluate", "response_logprobs", "student_metrics",
    "GADConfig", "gad", "Discriminator", "bradley_terry_loss", "discriminator_accuracy", "group_advantages",
    "grpo_loss",
    "align_proxy", "proxy_preference_loss", "proxy_kd_weights", "alignment_diagnostics", "top1_match_ratio",
    "topk_mass_share", "calibrate_combination",
]
__version__ = "0.1.0"

# The trainer and the posterior import transformers' Trainer and model classes (seconds): load them on first use
# so `import bayeskd` and the CLI's --help stay fast.
_LAZY = {name: "bayeskd.posterior" for name in ("ProxyPosterior", "estimate_posterior")}
_LAZY.update({name: "bayeskd.lab" for name in ("build_lab", "BlackBoxTeacher", "WhiteBoxTeacher",
                                               "sample_teacher_jsonl")})
_LAZY.update({name: "bayeskd.lab_run" for name in ("run_lab", "LabRunConfig")})
_LAZY.update({name: "bayeskd.evaluate" for name in ("evaluate", "response_logprobs", "student_metrics")})
_LAZY.update({name: "bayeskd.gad" for name in ("GADConfig", "gad", "Discriminator", "bradley_terry_loss",
                                               "discriminator_accuracy", "group_advantages", "grpo_loss")})
_LAZY.update({name: "bayeskd.proxy_kd" for name in ("align_proxy", "proxy_preference_loss", "proxy_kd_weights",
                                                    "alignment_diagnostics", "top1_match_ratio", "topk_mass_share")})
_LAZY.update({name: "bayeskd.calibrate" for name in ("calibrate_combination",)})
_LAZY.update({name: "bayeskd.train" for name in ("BayesKDConfig", "BayesKDTrainer", "BayesKDCollator",
                                                 "TeacherTargetsDataset", "distill")})


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bayeskd' has no attribute {name!r}")
