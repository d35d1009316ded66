"""`--config FILE`: a command's options from a TOML file (read with tomllib).

The file's keys are the command's long option names without the leading `--` (`cpu-workers = 2`;
`cpu_workers` is accepted too) and `model` for the MODEL argument. They become click's defaults for
the command, so a flag given on the command line wins over the file, and the file over the built-in
default. A list stands for a comma-separated option (`devices = ["cuda:0", "cuda:1"]`).
`serve --print-config` prints the options in effect in the same format.
"""

from __future__ import annotations

import tomllib

import click
import tomli_w

NOT_IN_FILE = {"config", "print_config"}  # options about the config itself
NOT_PRINTED = NOT_IN_FILE | {"api_key"}  # and secrets, which --print-config leaves out


def _key(p: click.Parameter) -> str:
    """The file key of a parameter: its first long option name, or an argument's name."""
    return next((o[2:] for o in p.opts if o.startswith("--")), p.name) if isinstance(p, click.Option) else p.name


def _keys(command: click.Command) -> dict[str, str]:
    """File key (with dashes or underscores) -> parameter name, for every long option and argument
    of `command`."""
    keys = {}
    for p in command.params:
        names = [o[2:] for o in p.opts if o.startswith("--")] if isinstance(p, click.Option) else [p.name]
        for n in names:
            keys[n] = keys[n.replace("-", "_")] = p.name
    return keys


def _plain(value):
    """A TOML value as click parses a command-line string: a list joins with commas; booleans stay
    (flags take them as they are)."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value if isinstance(value, bool) else str(value)


def _load(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path} is not valid TOML: {e}") from None
    keys = _keys(ctx.command)
    unknown = sorted(k for k in data if k not in keys or keys[k] in NOT_IN_FILE)
    if unknown:
        raise click.BadParameter(f"{path}: {', '.join(unknown)} is no option of `{ctx.command.name}` "
                                 f"(see `krasis-coord {ctx.command.name} --help`)")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise click.BadParameter(f"{path}: {nested[0]} is a table; options are plain `name = value` lines")
    ctx.default_map = {**(ctx.default_map or {}), **{keys[k]: _plain(v) for k, v in data.items()}}


def config_option(f):
    """--config FILE for a command: read first (eager), so the other options see its values as defaults."""
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load, help="Read options from this TOML file: `long-option-name = value` per "
                        "line (and `model = PATH`); command-line flags win over it.")(f)


def effective(ctx: click.Context) -> str:
    """The options in effect for this invocation as a TOML document that --config reads back: every
    parameter that has a value, secrets left out."""
    out = {}
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name in NOT_PRINTED or value is None:
            continue
        # HOST:PORT options arrive parsed into (host, port)
        out[_key(p)] = ":".join(map(str, value)) if isinstance(value, tuple) else value
    return tomli_w.dumps(out)
