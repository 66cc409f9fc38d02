"""The byte-budget arithmetic of benchmarks/bench_targets.py (equal bytes per token: K and the sampled split)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_targets", ROOT / "benchmarks" / "bench_targets.py")
bt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bt)


def test_raw_k_fits_the_budget():
    assert [bt.raw_k(b) for b in (64, 128, 256, 516)] == [7, 15, 31, 64]
    for b in range(12, 600):
        k = bt.raw_k(b)
        assert 4 + 8 * k <= b < 4 + 8 * (k + 1)


def test_compact_k_from_a_linear_fit():
    a, b = bt.fit_bytes([7, 15, 31], [6 + 2.25 * 7, 6 + 2.25 * 15, 6 + 2.25 * 31])
    assert abs(a - 6) < 1e-9 and abs(b - 2.25) < 1e-9
    assert bt.k_for_budget(150, a, b) == 64  # 6 + 2.25 * 64 = 150 exactly
    assert bt.k_for_budget(149.9, a, b) == 63
    assert bt.k_for_budget(1, a, b) == 1


def test_sampled_split_and_more_draws():
    assert bt.sample_split(52, 0.5, 64) == (26, 26)
    assert bt.sample_split(107, 0.5, 64) == (53, 54)
    assert bt.sample_split(200, 0.5, 64) == (64, 136)  # keep_top capped at the posterior's K
    assert bt.sample_split(10, 0.0, 64) == (0, 10)
    assert bt.more_draws(26, 26, 52, 26 + 13) == 52  # half the draws merged: twice the draws
    assert bt.more_draws(26, 26, 52, 52) == 26  # never fewer
