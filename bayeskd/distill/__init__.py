"""Distilling a student: targets.py (records paired with their target rows, the collator, Proxy-KD weights),
trainer.py (`BayesKDConfig`, `BayesKDTrainer`, the `distill` job), proxy_kd.py (the `align-proxy` job), gad.py
(the `gad` job) with gad_parts.py (its losses and discriminator model)."""
from bayeskd._moved import lazy

_NAMES = {**{n: "bayeskd.distill.targets" for n in ("TeacherTargetsDataset", "BayesKDCollator", "proxy_kd_weights")},
          **{n: "bayeskd.distill.trainer" for n in ("BayesKDConfig", "BayesKDTrainer", "distill",
                                                     "whitebox_targets")},
          **{n: "bayeskd.distill.proxy_kd" for n in ("align_proxy", "proxy_preference_loss", "alignment_diagnostics",
                                                      "top1_match_ratio", "topk_mass_share", "sequence_logprobs")},
          **{n: "bayeskd.distill.gad" for n in ("GADConfig", "gad")},
          **{n: "bayeskd.distill.gad_parts" for n in ("Discriminator", "bradley_terry_loss", "discriminator_accuracy",
                                                       "group_advantages", "grpo_loss")}}
__all__ = sorted(_NAMES)
__getattr__ = lazy(__name__, _NAMES)
