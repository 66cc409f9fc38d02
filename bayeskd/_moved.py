"""Old module paths from before the stage folders (bayeskd 0.1): thin aliases that warn, kept for one release;
and the lazy re-exports of the stage packages."""
from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, *new: str, renamed: dict[str, tuple[str, str]] | None = None) -> None:
    """Make module `old` look up every attribute in the modules `new` (first match wins), with a warning.
    `renamed`: old name -> (module, new name) for constants that now live elsewhere under one name."""
    warnings.warn(f"{old} has moved to {' and '.join(new)}; the old path goes away in the next release",
                  DeprecationWarning, stacklevel=3)
    targets = [importlib.import_module(n) for n in new]
    module = sys.modules[old]

    def __getattr__(name: str):
        if renamed and name in renamed:
            return getattr(importlib.import_module(renamed[name][0]), renamed[name][1])
        for t in targets:
            if hasattr(t, name):
                return getattr(t, name)
        raise AttributeError(f"module {old!r} (moved to {', '.join(new)}) has no attribute {name!r}")

    module.__getattr__ = __getattr__
    module.__all__ = sorted({n for t in targets for n in getattr(t, "__all__", public(t))})


def public(module) -> list[str]:
    return [k for k in vars(module) if not k.startswith("_")]


def lazy(package: str, names: dict[str, str]):
    """A module `__getattr__` for `package` that imports `names[name]` (a submodule) on first use, so importing
    the package stays light (transformers, TRL) and free of import circles."""
    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
