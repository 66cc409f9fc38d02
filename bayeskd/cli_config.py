"""`--config FILE` for every command: a YAML or JSON mapping of option names to values, checked key by key as the
command line is (unknown keys and ill-typed values are usage errors naming the file and the key)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _load_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """`--config cfg.yaml|cfg.json` fills the command's defaults; options given on the command line win."""
    if not path:
        return path
    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith((".yaml", ".yml")):
            import yaml
            cfg = yaml.safe_load(text) or {}
        else:
            cfg = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes a usage error naming the file
        raise click.BadParameter(f"{path}: cannot parse config ({e})") from e
    if not isinstance(cfg, dict):
        raise click.BadParameter(f"{path}: a config must be a mapping of option names to values")
    known = {p.name for p in ctx.command.params}
    unknown = sorted(k for k in (key.replace("-", "_") for key in cfg) if k not in known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown option(s) {', '.join(unknown)}")
    params = {p.name: p for p in ctx.command.params}
    values = {}
    for key, v in cfg.items():
        name = key.replace("-", "_")
        if v is None:  # null: not set, the option's own default applies
            continue
        values[name] = _config_value(ctx, params[name], v, f"{path}: option '{key}'")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


def _config_value(ctx: click.Context, param: click.Parameter, v: Any, where: str) -> Any:
    """A config value converted as the option converts its command-line value, so an ill-typed one is a usage
    error naming the key now, not a TypeError deep in a job later (click itself calls int([1, 2]) on a list)."""
    scalar = (str, int, float, bool)
    if isinstance(v, dict) and getattr(param.type, "accepts_mapping", False):
        return v  # e.g. a DeepSpeed config written inline
    if param.multiple:
        v = list(v) if isinstance(v, (list, tuple)) else [v]  # one value for a repeatable option
        if not all(isinstance(x, scalar) for x in v):
            raise click.BadParameter(f"{where} must be a list of plain values, got {v!r:.60}")
    elif not isinstance(v, scalar):
        raise click.BadParameter(f"{where} must be a single value, got {type(v).__name__} {v!r:.60}")
    if getattr(param.type, "_number_class", None) and any(isinstance(x, bool) for x in (v if param.multiple else [v])):
        raise click.BadParameter(f"{where} must be a number, got a boolean")
    try:
        return param.type_cast_value(ctx, v)
    except click.BadParameter as e:
        raise click.BadParameter(f"{where}: {e.message}") from None


# Options several commands share, spelled once.
config_option = click.option(
    "--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config, is_eager=True,
    expose_value=False, help="YAML or JSON file of option values (command-line options override it).")


skip_bad_option = click.option("--skip-bad", is_flag=True,
                               help="Skip malformed records (counted in the summary) instead of failing.")
max_records_option = click.option("--max-records", default=None, type=click.IntRange(1),
                                  help="Use only the first N records.")

# ---------------------------------------------------------------------------------------------------- from configs

# Bounds of inherited `TrainingArguments` fields, checked as command-line errors naming the option.
TRAINING_LIMITS = {name: {"min": 1} for name in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                 "per_device_eval_batch_size")}


class JSONOrPath(click.ParamType):
    """A mapping-valued setting (a DeepSpeed or FSDP config, scheduler kwargs): JSON text on the command line, a
    mapping in a `--config` file, or a path the library reads itself."""
    name = "JSON|PATH"
    accepts_mapping = True

    def convert(self, value, param, ctx):
        if isinstance(value, dict) or not isinstance(value, str) or not value.lstrip().startswith("{"):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            self.fail(f"not valid JSON ({e})", param, ctx)


def _unwrap(tp: Any) -> tuple[Any, tuple, bool]:
    """(the type an option parses, the choices, repeatable) of a field's annotation: Optional dropped, the first of a
    union that parses (an Enum's values are the choices; a list is a repeatable option; a mapping is JSONOrPath)."""
    import enum
    import typing

    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return str, tuple(str(a) for a in typing.get_args(tp) if a is not False), False
    if origin in (list, tuple):
        inner, choices, _ = _unwrap(typing.get_args(tp)[0] if typing.get_args(tp) else str)
        return inner, choices, True
    if origin is dict or tp is dict:
        return JSONOrPath(), (), False
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return str, tuple(str(m.value) for m in tp), False
    if origin in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if any(typing.get_origin(a) is dict or a is dict for a in args):
            return JSONOrPath(), (), False
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:
            return _unwrap(enums[0])
        if len(args) == 1:
            return _unwrap(args[0])
        if str in args:  # str | list[str], str | bool, str | Literal[False], ...
            lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
            return (str, (), True) if lists and typing.get_args(lists[0]) == (str,) else (str, (), False)
        return _unwrap(args[0])
    return tp, (), False


def config_options(config_cls: type, *, skip: tuple[str, ...] = (), extra: dict[str, dict] | None = None,
                   ) -> list[click.Option]:
    """One click option per field of the dataclass `config_cls`, the way `HfArgumentParser` reads it: `--field-name`,
    the field's type (an Enum or `choices` metadata: a choice; a bool: `--x/--no-x`; a list: repeatable; a mapping:
    JSON or a path), its default and its `help` metadata. Metadata `flags` names the option (e.g. a shorter or an
    older name); `min`/`max` (and `min_open`) bound a number, as a command-line error naming the option.
    `extra` adds metadata to inherited fields (e.g. limits of `TrainingArguments` fields). Fields whose type has no
    command-line form (an object) and `skip` are left out; a field without a default is a required option. A bool field
    named `no_x` that defaults to False is the plain switch `--no-x`."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_cls)
    inherited = {n for base in config_cls.__mro__[1:] for n in getattr(base, "__dataclass_fields__", {})}
    options = []
    for f in sorted(dataclasses.fields(config_cls), key=lambda f: f.name in inherited):  # its own fields first
        if not f.init or f.name in skip:
            continue
        meta = {**f.metadata, **(extra or {}).get(f.name, {})}
        tp, choices, multiple = _unwrap(hints.get(f.name, str))
        if "choices" in meta:
            choices = tuple(str(c) for c in meta["choices"])
        if not (tp in (str, int, float, bool) or isinstance(tp, click.ParamType)):
            continue  # e.g. accelerate's ParallelismConfig: set it from Python
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        flags = list(meta.get("flags") or ["--" + f.name.replace("_", "-")])
        help_text = meta.get("help")
        kw: dict[str, Any] = dict(help=help_text, required=required, multiple=multiple)
        if hasattr(default, "value") and not isinstance(default, (str, int, float)):
            default = default.value  # an Enum member
        if tp is bool and not multiple and f.name.startswith("no_") and default is False:
            kw.update(is_flag=True, type=bool)  # a switch that turns something off: --no-x, not --no-x/--no-no-x
        elif tp is bool and not multiple:
            flags = [f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:]]
            kw["type"] = bool
        elif choices:
            kw["type"] = click.Choice(choices)
        elif tp in (int, float) and ("min" in meta or "max" in meta):
            rng = click.IntRange if tp is int else click.FloatRange
            kw["type"] = rng(meta.get("min"), meta.get("max"), **({"min_open": True} if meta.get("min_open") else {}))
        else:
            kw["type"] = tp
        if multiple:
            default = list(default) if isinstance(default, (list, tuple)) else None
        elif isinstance(default, (list, dict)):
            default = None
        if not required:
            kw.update(default=default, show_default=default not in (None, "", [], ()))
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        options.append(click.Option([*flags, f.name], **kw))
    return options


class ConfigCommand(click.Command):
    """A command whose options are generated from its job's config dataclass (`config_options`) on first use, after
    the ones its decorators name: `make_options()` imports the job's module then, so `bayeskd --help` and the other
    commands do not pay for it."""

    def __init__(self, *args, make_options, **kwargs):
        self._make_options = make_options
        super().__init__(*args, **kwargs)

    @property
    def params(self) -> list[click.Parameter]:
        if self._make_options is not None:
            make, self._make_options = self._make_options, None
            named = {p.name for p in self._params}
            self._params = self._params + [p for p in make() if p.name not in named]
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value


def given(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options set on the command line or in `--config` (not their defaults): the job applies its config's own
    defaults to the rest, so a default lives in one place."""
    from click.core import ParameterSource

    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()  # a repeatable option: a list
            if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
