"""Lazy re-exports for the packages' __init__ files (the idea of TRL's `_LazyModule`, as a PEP 562 `__getattr__`).

A package lists which names it re-exports from which module (its `_LAZY` table); each is imported on first use. So
`import bayeskd` and the CLI's --help do not load transformers, TRL or FastAPI, and a package face adds no import
circle. The package repeats the table as imports under `if TYPE_CHECKING:`, which is what type checkers and IDEs
read; tests/test_structure.py checks that the two agree and that no exported name is also a submodule's.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, table: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for the module `package`, which re-exports `table[module]` from each module."""
    home = {name: module for module, names in table.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        setattr(sys.modules[package], name, value)  # from now on a plain attribute: no second import lookup
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | home.keys())

    return __getattr__, __dir__
