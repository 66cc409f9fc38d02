"""The research scripts stay runnable: experiments/gad_tune.py checks its variants (valid GAD settings) itself; run
as a user runs it (a subprocess), never imported by the tests."""
import subprocess
import sys
from pathlib import Path

import torch

from bayeskd.distillation.gad_parts import group_advantages

ROOT = Path(__file__).resolve().parents[1]


def test_gad_tune_variants_are_valid_gad_configs():
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "gad_tune.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_huge_advantage_epsilon_zeroes_the_grpo_term():
    """The SFT-only control of gad_tune: with adv_eps far above the rewards' spread the advantages are ~0, so only
    the SFT term (and the tiny KL) moves the student."""
    rewards = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 3  # spread like a trained D's scores
    assert group_advantages(rewards, 1e9).abs().max() < 1e-7
    assert group_advantages(rewards, 1e-6).abs().max() > 0.5
