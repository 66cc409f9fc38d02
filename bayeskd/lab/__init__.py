"""The lab: a teacher whose true distributions are readable. build.py (build the lab's models from the
embedded corpus), teacher.py (a sharper teacher: the lab teacher at a temperature < 1), http_sampling.py (the lab
teacher sampled as an API teacher: serve-teacher and generate over HTTP), records.py (the run's training
records file, JSONL or Parquet, that every stage reads), run.py (the `lab run` job: the whole pipeline scored
against the truth) with students.py, recipe.py, bayes.py, cross.py and report.py."""
from typing import TYPE_CHECKING

from bayeskd._lazy import lazy_exports

_LAZY = {
    "bayeskd.lab.build": ("build_lab", "LabError", "LabPreset", "ModelSize", "PRESETS", "get_preset", "split_corpus",
                          "load_lab_prompts", "read_manifest", "lab_paths", "train_causal_lm", "SharpLabPreset",
                          "sharp_preset"),
    "bayeskd.lab.teacher": ("sharpen_model", "sharpen_teacher", "search_tau"),
    "bayeskd.lab.run": ("run_lab", "LabRunConfig"),
    "bayeskd.lab.report": ("format_report",),
}
if TYPE_CHECKING:
    from bayeskd.lab.build import (PRESETS, LabError, LabPreset, ModelSize, SharpLabPreset, build_lab, get_preset,
                                   lab_paths, load_lab_prompts, read_manifest, sharp_preset, split_corpus,
                                   train_causal_lm)
    from bayeskd.lab.teacher import search_tau, sharpen_model, sharpen_teacher
    from bayeskd.lab.run import LabRunConfig, run_lab
    from bayeskd.lab.report import format_report

__all__ = ["build_lab", "LabError", "LabPreset", "ModelSize", "PRESETS", "get_preset", "split_corpus",
           "load_lab_prompts", "read_manifest", "lab_paths", "train_causal_lm", "SharpLabPreset", "sharp_preset",
           "sharpen_model", "sharpen_teacher", "search_tau", "run_lab", "LabRunConfig", "format_report"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
