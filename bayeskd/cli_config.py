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

codec_option = click.option(
    "--codec", default="compact", show_default=True, type=click.Choice(["raw", "compact"]),
    help="Target shard format: raw (int32 id + float32 log-prob, 8 bytes an entry) or compact (ids bit-packed, "
    "the sorted log-prob curve coded in steps, tail exact: <= 3 bytes an entry; KL to raw <= 1e-3 per position).")


GAD_DEFAULTS = {"sft_coef": 1.0, "baseline": "group", "scale_rewards": True}


def lm_head_options(f):
    """`distill`'s ways for the loss to meet the student's lm_head, and mixed precision."""
    f = click.option("--bf16/--no-bf16", default=False, show_default=True,
                     help="bf16 mixed precision (autocast; a GPU with bf16).")(f)
    f = click.option("--cut-logits/--no-cut-logits", default=False, show_default=True,
                     help="As --fused-linear, through the cut-logits Triton kernel (logits only as on-chip tiles; "
                     "CUDA).")(f)
    return click.option("--fused-linear/--no-fused-linear", default=False, show_default=True,
                        help="Hidden states and lm_head to the loss: the [N, V] logits are never built (row "
                        "chunks).")(f)


def gad_advantage_options(f):
    """`gad`'s options for the generator's objective beyond plain GRPO. The defaults are `GADConfig`'s (spelled
    here so the CLI starts without importing torch; a test holds them equal)."""
    f = click.option("--sft-coef", default=GAD_DEFAULTS["sft_coef"], show_default=True, type=click.FloatRange(0),
                     help="Weight of a cross-entropy term on the batch's teacher responses in each GRPO step (0: the "
                     "paper's GAD).")(f)
    f = click.option("--baseline", default=GAD_DEFAULTS["baseline"], show_default=True,
                     type=click.Choice(["group", "teacher"]),
                     help="Advantage baseline: the group's mean reward, or D's score of the prompt's teacher "
                     "response.")(f)
    return click.option("--scale-rewards/--no-scale-rewards", default=GAD_DEFAULTS["scale_rewards"],
                        show_default=True,
                        help="Divide advantages by the group's reward std (GRPO) or not (Dr. GRPO).")(f)
