"""Distilling a student: targets.py (records paired with their target rows, the collator, Proxy-KD weights),
trainer.py (`BayesKDConfig`, `BayesKDTrainer`, the `distill` job), align_proxy.py (the `align-proxy` job), gad.py
(the `gad` job) with gad_parts.py (its losses and discriminator model), checkpoints.py (checkpoint checksum
records, resume from the newest intact one).

The jobs `align_proxy` and `gad` are not re-exported here: `bayeskd.distillation.gad` is the module (the functions
are `bayeskd.gad` and `bayeskd.align_proxy`).
"""
from typing import TYPE_CHECKING

from bayeskd._lazy import lazy_exports

_LAZY = {
    "bayeskd.distillation.targets": ("TeacherTargetsDataset", "BayesKDCollator", "proxy_kd_weights"),
    "bayeskd.distillation.trainer": ("BayesKDConfig", "BayesKDTrainer", "distill", "whitebox_targets"),
    "bayeskd.distillation.align_proxy": ("proxy_preference_loss", "alignment_diagnostics", "top1_match_ratio",
                                         "topk_mass_share", "sequence_logprobs"),
    "bayeskd.distillation.gad": ("GADConfig",),
    "bayeskd.distillation.gad_parts": ("Discriminator", "bradley_terry_loss", "discriminator_accuracy",
                                       "group_advantages", "grpo_loss"),
}
if TYPE_CHECKING:
    from bayeskd.distillation.targets import BayesKDCollator, TeacherTargetsDataset, proxy_kd_weights
    from bayeskd.distillation.trainer import BayesKDConfig, BayesKDTrainer, distill, whitebox_targets
    from bayeskd.distillation.align_proxy import (alignment_diagnostics, proxy_preference_loss, sequence_logprobs,
                                                 top1_match_ratio, topk_mass_share)
    from bayeskd.distillation.gad import GADConfig
    from bayeskd.distillation.gad_parts import (Discriminator, bradley_terry_loss, discriminator_accuracy,
                                                group_advantages, grpo_loss)

__all__ = ["TeacherTargetsDataset", "BayesKDCollator", "proxy_kd_weights", "BayesKDConfig", "BayesKDTrainer", "distill",
           "whitebox_targets", "proxy_preference_loss", "alignment_diagnostics", "top1_match_ratio", "topk_mass_share",
           "sequence_logprobs", "GADConfig", "Discriminator", "bradley_terry_loss", "discriminator_accuracy",
           "group_advantages", "grpo_loss"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
