"""The package's shape: no import circle between its modules, bayeskd/kernels/ stand alone (Triton and torch only), no
source file over the length limit, every public name imports, and the old module paths still work (with a
warning) until the next release.

The import graph is static (`ast`): every import statement counts, at module level and inside functions.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 520
# Old paths from before the stage folders: thin aliases (`bayeskd._moved.alias`), left out of the import graph.
ALIASES = ("prior", "pipeline", "calibrate", "train", "proxy_kd", "gad", "eval", "evaluate", "lab_run")
# Old path -> {its new home: the public functions and classes the old module defined (bayeskd 0.1)}.
OLD_NAMES = {
    "prior": {"bayeskd.priors.ngram": ["NGramPrior", "fit_parallel"]},
    "pipeline": {"bayeskd.priors.estimate": ["estimate_prior", "embedded_defaults"]},
    "calibrate": {"bayeskd.posterior.calibrate": ["calibrate_combination", "calibrate_on_records", "token_logprob"]},
    "train": {"bayeskd.distill.trainer": ["distill", "BayesKDConfig", "BayesKDTrainer", "whitebox_targets"],
              "bayeskd.distill.targets": ["TeacherTargetsDataset", "BayesKDCollator"]},
    "proxy_kd": {"bayeskd.distill.proxy_kd": ["align_proxy", "alignment_diagnostics", "sequence_logprobs",
                                              "proxy_preference_loss", "top1_match_ratio", "topk_mass_share",
                                              "sample_responses", "pretokenized_dpo_trainer_class"],
                 "bayeskd.distill.targets": ["proxy_kd_weights"]},
    "gad": {"bayeskd.distill.gad": ["gad", "GADConfig", "Discriminator", "bradley_terry_loss",
                                    "discriminator_accuracy", "group_advantages", "grpo_loss"]},
    "eval": {"bayeskd.evaluation.metrics": ["kl_teacher_to_estimate", "top1_match", "topk_mass_coverage",
                                            "smoothed_one_hot", "summarize", "Estimate"]},
    "evaluate": {"bayeskd.evaluation.evaluate": ["evaluate", "response_logprobs", "student_metrics",
                                                 "response_tokens", "estimate_metrics", "read_target_rows",
                                                 "estimation_table", "one_hot_estimate", "sample_own",
                                                 "format_estimation"]},
    "lab_run": {"bayeskd.lab.run": ["run_lab", "LabRunConfig", "train_prompts", "format_report"]},
}


# ---------------------------------------------------------------------------------------------------- import graph

def project_modules() -> dict[str, Path]:
    """Module name -> file: bayeskd/**.py. The deprecated alias modules are left out."""
    files: dict[str, Path] = {}
    for p in sorted((ROOT / "bayeskd").rglob("*.py")):
        parts = [x for x in p.relative_to(ROOT / "bayeskd").with_suffix("").parts if x != "__init__"]
        files[".".join(["bayeskd"] + parts)] = p
    for old in ALIASES:
        files.pop(f"bayeskd.{old}")
    return files


def imports_of(module: str, path: Path) -> list[tuple[int, str, list[str], int]]:
    """(line, imported module with relative imports resolved, names taken from it, relative level) of every import
    in `path`."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, [], 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod, [a.name for a in node.names], node.level))
    return out


def _resolve(name: str, known) -> str | None:
    """The longest prefix of `name` that is one of `known` (a package counts as its __init__.py)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(files: dict[str, Path]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """(module -> {imported project module: line}, imports of a deprecated alias). `from a.b import c` is an edge to
    a.b.c when that is a module, else to a.b (its __init__.py for a package)."""
    aliases = {f"bayeskd.{old}" for old in ALIASES}
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    uses_alias = []
    for m, path in files.items():
        for line, mod, names, _ in imports_of(m, path):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in files or f"{mod}.{n}" in aliases]
            if len(targets) < len(names) or not names:
                targets.append(mod)
            for t in targets:
                if t in aliases or _resolve(t, files.keys() | aliases) in aliases:
                    uses_alias.append(f"{path.relative_to(ROOT)}:{line} imports the deprecated {t}")
                    continue
                dst = _resolve(t, files)
                if dst is not None and dst != m:
                    graph[m].setdefault(dst, line)
    return graph, uses_alias


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle [a, b, ..., a] (iterative depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_circle():
    files = project_modules()
    graph, uses_alias = import_graph(files)
    assert sum(len(v) for v in graph.values()) > 20, "the import graph is suspiciously small"
    assert "bayeskd.teacher_forcing" in graph["bayeskd.posterior.proxy"]  # a known edge: the parser works
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} ({files[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import circle:\n  " + "\n  ".join(steps))
    assert not uses_alias, "package code imports a deprecated path:\n  " + "\n  ".join(uses_alias)


def test_import_checker_finds_a_circle(tmp_path):
    """The checker itself: a circle through a package's __init__, a function-level relative import and a
    `from package import submodule` is found; the same files without the back edge have none."""
    (tmp_path / "p").mkdir()
    src = {"p/__init__.py": "from p.a import f\n", "p/a.py": "def f():\n    from . import b\n",
           "p/b.py": "import os\nfrom p import f\n", "c.py": "from p.a import f\n"}
    for name, text in src.items():
        (tmp_path / name).write_text(text)
    files = {"p": tmp_path / "p/__init__.py", "p.a": tmp_path / "p/a.py", "p.b": tmp_path / "p/b.py",
             "c": tmp_path / "c.py"}
    graph, _ = import_graph(files)
    assert graph == {"p": {"p.a": 1}, "p.a": {"p.b": 2}, "p.b": {"p": 2}, "c": {"p.a": 1}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["p", "p.a", "p.b"], cycle
    (tmp_path / "p/b.py").write_text("import os\n")
    assert find_cycle(import_graph(files)[0]) is None


def test_kernels_import_no_bayeskd_module():
    """bayeskd/kernels/ import torch, Triton and each other (relatively), nothing from bayeskd."""
    bad = []
    for m, path in project_modules().items():
        if not m.startswith("bayeskd.kernels"):
            continue
        for line, mod, names, level in imports_of(m, path):
            within = mod == "bayeskd.kernels" or mod.startswith("bayeskd.kernels.")
            if (level == 0 and mod.split(".")[0] == "bayeskd") or (level > 0 and not within):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {mod}" + (" (relative)" if level else ""))
    assert not bad, "bayeskd/kernels/ must import nothing from bayeskd:\n  " + "\n  ".join(bad)


def test_no_file_over_the_line_limit():
    paths = [p for d in ("bayeskd", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in paths}
    over = sorted(f"{f} ({n} lines)" for f, n in sizes.items() if n > MAX_LINES)
    print(f"{len(sizes)} files; longest: {max(sizes.items(), key=lambda kv: kv[1])}")
    if over:
        print("over the limit:", *over, sep="\n  ")
    assert not over, f"files over {MAX_LINES} lines: {', '.join(over)}"


# ---------------------------------------------------------------------------------------------------- public names

def test_every_public_name_imports():
    import bayeskd

    missing = []
    for name in bayeskd.__all__:
        try:
            getattr(bayeskd, name)
        except Exception as e:  # noqa: BLE001 - report every failure, whatever the error
            missing.append(f"{name}: {type(e).__name__}: {e}")
    assert not missing, "bayeskd.__all__ names that do not import:\n  " + "\n  ".join(missing)
    assert len(set(bayeskd.__all__)) == len(bayeskd.__all__), "bayeskd.__all__ lists a name twice"


_OLD_PATHS_SCRIPT = r"""
import importlib, json, sys, warnings
spec = json.loads(sys.argv[1])
problems = []
for old, homes in spec.items():
    name = "bayeskd." + old
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module = importlib.import_module(name)
        except Exception as e:
            problems.append(f"import {name}: {type(e).__name__}: {e}")
            continue
    if not any(issubclass(w.category, DeprecationWarning) and name in str(w.message) for w in caught):
        problems.append(f"import {name} (first import) emits no DeprecationWarning naming it")
    for home, names in homes.items():
        new = importlib.import_module(home)
        for n in names:
            if not hasattr(module, n):
                problems.append(f"{name}.{n} is missing")
            elif not hasattr(new, n):
                problems.append(f"{home}.{n} (the new home) is missing")
            elif getattr(module, n) is not getattr(new, n):
                problems.append(f"{name}.{n} is not {home}.{n}")
print(json.dumps(problems))
"""


def test_old_paths_alias_the_new_homes_and_warn():
    """Each old module path, imported first in a fresh interpreter, warns and gives the new home's objects."""
    r = subprocess.run([sys.executable, "-c", _OLD_PATHS_SCRIPT, json.dumps(OLD_NAMES)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    problems = json.loads(r.stdout.strip().splitlines()[-1])
    assert not problems, "old module paths:\n  " + "\n  ".join(problems)
