"""The lab: a teacher whose true distributions are readable. build.py (build the lab's models from the
embedded corpus), teacher.py (a sharper teacher: the lab teacher at a temperature < 1), run.py (the `lab run` job:
the whole pipeline scored against the truth)."""
from bayeskd._moved import lazy

_NAMES = {**{n: "bayeskd.lab.build" for n in ("build_lab", "LabError", "LabPreset", "ModelSize", "PRESETS",
                                               "get_preset", "split_corpus", "load_lab_prompts", "read_manifest",
                                               "lab_paths", "train_causal_lm", "SharpLabPreset",
                                               "sharp_preset")},
          **{n: "bayeskd.lab.teacher" for n in ("sharpen_model", "sharpen_teacher", "search_tau")},
          **{n: "bayeskd.lab.run" for n in ("run_lab", "LabRunConfig")},
          "format_report": "bayeskd.lab.report",
          # the lab's teacher lives in bayeskd.teachers since the stage folders; kept here for old imports
          **{n: "bayeskd.teachers.local" for n in ("BlackBoxTeacher", "WhiteBoxTeacher")},
          **{n: "bayeskd.teachers.sampling" for n in ("sample_records", "sample_teacher_jsonl")}}
__all__ = sorted(_NAMES)
__getattr__ = lazy(__name__, _NAMES)
