"""What every job's config dataclass shares: `setting` (a field with its help and limits, the metadata
`bayeskd.cli_config.config_options` makes an option from) and `job_config` (the config a job runs with, from a
config object or from keyword arguments naming its fields). Imports nothing from bayeskd, so a config dataclass
costs nothing to define."""
from __future__ import annotations

from dataclasses import field, fields
from typing import Any, TypeVar

C = TypeVar("C")


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A config field: its default (written here once: the library's and the command line's), its `help` and
    option metadata (`choices`, `min`/`max`/`min_open`, `flags`, `metavar`)."""
    return field(default=default, metadata={"help": help, **meta})


def job_config(cls: type[C], config: C | None, settings: dict[str, Any], job: str) -> C:
    """`config`, or `cls(**settings)`: a job takes either its config or keyword arguments naming its fields, not
    both; an unknown name is a ValueError listing the known ones."""
    if config is not None:
        if settings:
            raise ValueError(f"{job}: give either config or settings ({', '.join(sorted(settings))}), not both")
        if not isinstance(config, cls):
            raise TypeError(f"{job}: config must be a {cls.__name__}, got {type(config).__name__}")
        return config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{job}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**settings)
