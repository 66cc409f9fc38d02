"""benchmarks/gad_tune.py's variants are valid GAD settings, and its SFT-term control really switches GRPO off."""
import importlib.util
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from bayeskd.distill.gad import GADConfig
from bayeskd.distill.gad_parts import group_advantages

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # gad_tune imports gad_reward beside it, as when run as a script
spec = importlib.util.spec_from_file_location("gad_tune", ROOT / "benchmarks" / "gad_tune.py")
gt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gt)


@pytest.mark.parametrize("name", sorted(gt.VARIANTS))
def test_every_variant_is_a_valid_gad_config(name):
    settings = gt.variant_settings("tiny", name)
    known = {f.name for f in fields(GADConfig)}
    assert set(settings) - known <= {"discriminator"}, set(settings) - known
    GADConfig(**{k: v for k, v in settings.items() if k != "discriminator"})  # validates the values


def test_the_first_recipe_stays_what_it_was():
    lab = gt.variant_settings("tiny", "lab")
    assert (lab["temperature"], lab["sft_coef"], lab["steps"], lab["warmup_d_only_steps"]) == (0.8, 0.0, 30, 10)


def test_the_control_zeroes_the_advantages():
    settings = gt.variant_settings("tiny", "t1_sft_only_60")
    assert settings["sft_coef"] == 1.0 and settings["steps"] == 60
    torch.manual_seed(0)
    rewards = torch.randn(4, 8) * 3  # D's scores: spread like a trained D's
    adv = group_advantages(rewards, settings["adv_eps"])
    assert adv.abs().max() < 1e-7  # the GRPO term's gradient is ~0: only the SFT term (and the tiny KL) moves G
