"""The package's shape: no import circle between its modules, bayeskd/kernels/ stand alone (Triton and torch only), no
alias module (a module path is the file that holds the code), and the packages' lazy re-exports (`bayeskd._lazy`)
resolve, agree with their `if TYPE_CHECKING:` imports and never shadow a submodule. Files are sized by concept, not
by a line cap.

The import graph is static (`ast`): every import statement counts, at module level and inside functions.
"""
import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- import graph

def project_modules() -> dict[str, Path]:
    """Module name -> file: bayeskd/**.py."""
    files: dict[str, Path] = {}
    for p in sorted((ROOT / "bayeskd").rglob("*.py")):
        parts = [x for x in p.relative_to(ROOT / "bayeskd").with_suffix("").parts if x != "__init__"]
        files[".".join(["bayeskd"] + parts)] = p
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


def import_graph(files: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line}. `from a.b import c` is an edge to a.b.c when that is a module, else
    to a.b (its __init__.py for a package)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for m, path in files.items():
        for line, mod, names, _ in imports_of(m, path):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in files]
            if len(targets) < len(names) or not names:
                targets.append(mod)
            for t in targets:
                dst = _resolve(t, files)
                if dst is not None and dst != m:
                    graph[m].setdefault(dst, line)
    return graph


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
    graph = import_graph(files)
    assert sum(len(v) for v in graph.values()) > 20, "the import graph is suspiciously small"
    assert "bayeskd.teacher_forcing" in graph["bayeskd.posterior.proxy"]  # a known edge: the parser works
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} ({files[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import circle:\n  " + "\n  ".join(steps))


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
    graph = import_graph(files)
    assert graph == {"p": {"p.a": 1}, "p.a": {"p.b": 2}, "p.b": {"p": 2}, "c": {"p.a": 1}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["p", "p.a", "p.b"], cycle
    (tmp_path / "p/b.py").write_text("import os\n")
    assert find_cycle(import_graph(files)) is None


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


def test_core_imports_no_stage():
    """bayeskd/core/ (the math every stage shares) sits below the stages: it imports itself, and bayeskd.integrity and
    bayeskd.codec for the shards' files, nothing else from bayeskd."""
    allowed = ("bayeskd.core", "bayeskd.integrity", "bayeskd.codec")
    bad = []
    for m, path in project_modules().items():
        if not m.startswith("bayeskd.core"):
            continue
        for line, mod, names, level in imports_of(m, path):
            if mod.split(".")[0] == "bayeskd" and not any(mod == a or mod.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {mod}")
    assert not bad, "bayeskd/core/ must import no stage:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------------------------------------------- no aliases

def forwarding_only(path: Path) -> bool:
    """Whether a module only forwards to others: it defines no function, class or constant of its own (imports,
    calls such as `alias(__name__, ...)` and dunder assignments do not count), or it has a module `__getattr__`."""
    tree = ast.parse(path.read_text(), str(path))
    if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
        return True
    if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in ast.walk(tree)):
        return False
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)]
        if "__getattr__" in names:
            return True
        if any(not (n.startswith("__") and n.endswith("__")) for n in names):
            return False
    return True


def test_no_alias_module():
    """A module path is the file that holds the code: no module (the package faces, __init__.py, aside) only forwards
    to others, and no package face writes its own `__getattr__` (they use `bayeskd._lazy`)."""
    files = project_modules()
    aliases = [str(p.relative_to(ROOT)) for p in files.values() if p.name != "__init__.py" and forwarding_only(p)]
    assert not aliases, "modules that only forward to others:\n  " + "\n  ".join(aliases)
    faces = [p for p in files.values() if p.name == "__init__.py"]
    by_hand = [str(p.relative_to(ROOT)) for p in faces if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
                                                              for n in ast.parse(p.read_text()).body)]
    assert not by_hand, "package faces with a hand-written __getattr__ (use bayeskd._lazy):\n  " + "\n  ".join(by_hand)


def test_alias_checker_finds_an_alias(tmp_path):
    """The checker itself: a warn-and-forward module, a module of re-exports and a module `__getattr__` are aliases;
    a module with a constant of its own is not."""
    src = {"old.py": '"""Deprecated path."""\nfrom p._moved import alias\n\nalias(__name__, "p.new")\n',
           "face.py": 'from p.new import f\n__all__ = ["f"]\n',
           "ga.py": 'X = 1\n\ndef __getattr__(name):\n    return 0\n',
           "real.py": '"""Real."""\nimport os\n\nLIMIT = 3\n'}
    for name, text in src.items():
        (tmp_path / name).write_text(text)
    assert {name: forwarding_only(tmp_path / name) for name in src} == {"old.py": True, "face.py": True,
                                                                        "ga.py": True, "real.py": False}


# ---------------------------------------------------------------------------------------------------- public names

def package_faces() -> dict[str, Path]:
    """Package name -> its __init__.py."""
    return {m: p for m, p in project_modules().items() if p.name == "__init__.py"}


def type_checking_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import under the module-level `if TYPE_CHECKING:`."""
    out = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            out += [(n.module, a.name) for n in node.body if isinstance(n, ast.ImportFrom) for a in n.names]
    return out


def test_lazy_tables_match_their_type_checking_imports():
    """A package that re-exports lazily does it through `bayeskd._lazy`, its `if TYPE_CHECKING:` block imports
    exactly its table's names from the same modules (what a type checker or an IDE reads is what runtime gives), and
    its literal `__all__` (which static tools read) is what it exports: its imports and its lazy table."""
    problems, lazy_packages = [], 0
    for name, path in package_faces().items():
        pkg = importlib.import_module(name)
        table = getattr(pkg, "_LAZY", None)
        declared = type_checking_imports(path)
        if table is None:
            if declared:
                problems.append(f"{name}: TYPE_CHECKING imports without a lazy table")
            continue
        lazy_packages += 1
        pairs = [(module, n) for module, names in table.items() for n in names]
        if getattr(pkg.__getattr__, "__module__", None) != "bayeskd._lazy":
            problems.append(f"{name}: __getattr__ is not bayeskd._lazy's")
        if len({n for _, n in pairs}) != len(pairs):
            problems.append(f"{name}: its lazy table lists a name twice")
        if sorted(pairs) != sorted(declared):
            problems.append(f"{name}: lazy table and TYPE_CHECKING differ: {sorted(set(pairs) ^ set(declared))}")
        eager = {a.asname or a.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ImportFrom)
                 and n.module not in ("typing", "bayeskd._lazy") for a in n.names}
        if set(pkg.__all__) != eager | {n for _, n in pairs}:
            problems.append(f"{name}: __all__ is not its imports and its lazy table: "
                            f"{sorted(set(pkg.__all__) ^ (eager | {n for _, n in pairs}))}")
    assert lazy_packages >= 7, "fewer lazy package faces than expected: is the table still called _LAZY?"
    assert not problems, "\n  ".join(["lazy exports:"] + problems)


def test_every_exported_name_resolves():
    """Every name in every package's __all__ imports and is what its module defines, never a submodule: Python sets
    a submodule as its package's attribute when it is first imported, so an exported name equal to a submodule's
    would be the function or the module depending on what was imported before."""
    problems = []
    for name, path in package_faces().items():
        pkg = importlib.import_module(name)
        exported = list(getattr(pkg, "__all__", []))
        if len(set(exported)) != len(exported):
            problems.append(f"{name}.__all__ lists a name twice")
        submodules = {m.name for m in pkgutil.iter_modules([str(path.parent)])}
        problems += [f"{name}.{n} is also a submodule's name" for n in sorted(submodules & set(exported))]
        home = {n: module for module, names in getattr(pkg, "_LAZY", {}).items() for n in names}
        for n in exported:
            try:
                value = getattr(pkg, n)
            except Exception as e:  # noqa: BLE001 - report every failure, whatever the error
                problems.append(f"{name}.{n}: {type(e).__name__}: {e}")
                continue
            if isinstance(value, types.ModuleType):
                problems.append(f"{name}.{n} is a module")
            elif n in home and value is not getattr(importlib.import_module(home[n]), n):
                problems.append(f"{name}.{n} is not {home[n]}.{n}")
    assert not problems, "exported names:\n  " + "\n  ".join(problems)
