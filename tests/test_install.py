"""The install as a user meets it: nothing in the repository root shadows a dependency, and the libraries we build
on import in a Python started in the root (issue 26: a top-level `kernels/` hid Hugging Face's `kernels` package
from transformers, so `transformers.Trainer` failed to import wherever the root was the working directory)."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def importable_root_names(root: Path) -> dict[str, str]:
    """Name -> what it is, for every entry of `root` that `import NAME` could find with `root` on sys.path:
    modules (.py, extension modules), packages and namespace folders (any folder named like an identifier)."""
    names = {}
    for p in root.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix in (".py", ".so", ".pyd") and p.stem.isidentifier():
            names[p.name.split(".")[0]] = "module"
        elif p.is_dir() and p.name.isidentifier():
            names[p.name] = "package" if (p / "__init__.py").exists() else "namespace folder"
    return names


def test_root_names_shadow_no_installed_distribution():
    installed = importlib.metadata.packages_distributions()  # top-level module -> distributions providing it
    assert {"torch", "transformers", "trl", "numpy"} <= installed.keys()  # the lookup sees the environment
    ours = {"bayeskd"}
    names = importable_root_names(ROOT)
    assert "bayeskd" in names and names["bayeskd"] == "package"
    clashes = {n: sorted(installed[n]) for n in names if n in installed and set(installed[n]) - ours}
    assert not clashes, ("names at the repository root that shadow installed distributions (Python run in the root "
                         f"imports ours instead): {clashes}")


def test_the_checker_sees_a_shadowing_name(tmp_path):
    """The checker itself: a top-level `kernels/` package and a `yaml.py` are found as importable names."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "docs-site").mkdir()  # not an identifier: not importable
    assert importable_root_names(tmp_path) == {"kernels": "package", "yaml": "module"}


def test_dependencies_import_with_the_repository_root_as_working_directory():
    code = ("import sys; assert sys.path[0] in ('', '.') or sys.path[0] == __import__('os').getcwd();"
            "import transformers; transformers.Trainer; import trl; trl.DPOTrainer;"
            "import bayeskd, bayeskd.kernels.sparse_kd, bayeskd.cli;"
            "import importlib.util as u; print(u.find_spec('cli') is None, bayeskd.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    no_cli, kernels_file = out.stdout.split()
    assert no_cli == "True"
    assert Path(kernels_file).resolve() == ROOT / "bayeskd" / "kernels" / "__init__.py"
