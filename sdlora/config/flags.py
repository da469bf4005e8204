"""Typed configuration sections whose fields are also command-line flags and config-file keys.

A section is a frozen dataclass; each field declared with `flag(default, help, ...)` is the flag
`--<field name>` (plus aliases), the key `<field name>` in a config file, and one typed value in the
resolved configuration. So the flag table, the file format and the configuration are the same list.

    parser = build_parser(description, TrainConfig)
    cfg = parse_config(parser, TrainConfig, argv)  # defaults < --config FILE < command line
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import UserError

CONFIG_SUFFIXES = (".toml", ".json", ".yaml", ".yml")


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field is given: its help, closed set of values, other names, and what it means for a resume."""

    help: str
    choices: tuple | None = None
    aliases: tuple[str, ...] = ()
    resume: bool = False  # a resumed run must use the same value: it shapes the data, objective or adapter
    secret: bool = False  # never written to a file (a token)
    per_run: bool = False  # says what this invocation does (resume, overwrite), not what the run is
    metavar: str | None = None


def flag(default: Any, help: str, **options: Any) -> Any:
    """A dataclass field that is also the flag `--<name>`; see Flag for the options."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, **options)})


def section_fields(section: type) -> list[tuple[dataclasses.Field, Flag, type]]:
    """(field, its Flag, its value type) of every flag of a section class, in declaration order."""
    hints = typing.get_type_hints(section)
    return [
        (f, f.metadata["flag"], hints[f.name]) for f in dataclasses.fields(section) if "flag" in f.metadata
    ]


def sections_of(config_class: type) -> list[tuple[str, type]]:
    """(attribute, section class) of a configuration made of sections, in declaration order."""
    hints = typing.get_type_hints(config_class)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(config_class)]


def _base_type(hint) -> tuple[type, bool]:
    """(scalar type, is a list) of a field's annotation: `int | None` -> (int, False); `tuple[str, ...] | None`
    -> (str, True)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    inner = args[0]
    if typing.get_origin(inner) in (tuple, list):
        return typing.get_args(inner)[0], True
    return inner, False


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe_default(default) -> str:
    if default is None or default == () or default is False:
        return ""
    return f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"


def build_parser(description: str, config_class: type) -> argparse.ArgumentParser:
    """An argparse parser with one group per section and `--config FILE`; flags not given stay unset,
    so a config file's values are only overridden by what the command line names."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a TOML, JSON or YAML file of flag names and values (a run's config.toml re-runs it); "
        "flags on the command line override it",
    )
    for _, section in sections_of(config_class):
        group = parser.add_argument_group((section.__doc__ or section.__name__).split(":")[0].strip())
        for field, info, hint in section_fields(section):
            names = [f"--{field.name}", *(f"--{a}" for a in info.aliases)]
            kind, many = _base_type(hint)
            help_text = info.help + _describe_default(field.default)
            common = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
            if kind is bool and field.default is not False:  # None (auto) or True: --x / --no-x
                group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
            elif kind is bool:
                group.add_argument(*names, action="store_true", **common)
            else:
                extra = {"nargs": "+"} if many else {}
                if info.choices:
                    extra["choices"] = info.choices
                if info.metavar:
                    extra["metavar"] = info.metavar
                group.add_argument(*names, type=kind, **common, **extra)
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys and values of a TOML, JSON or YAML config file (a flat table of flag names)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file; pass --config with a .toml, .json or .yaml file")
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise UserError(f"{path}: a config file must end in {', '.join(CONFIG_SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, as a package
                import tomli as tomllib

            values = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - every parser's syntax error ends the same way for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable config file ({reason})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a config file holds a table of flag names and values")
    return values


def _coerce(path: str, key: str, value: Any, hint, choices) -> Any:
    """A config file's value as the field's type; UserError naming the file and key otherwise."""
    kind, many = _base_type(hint)
    if value is None:
        return None
    if many:
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(path, key, v, kind, choices) for v in items)
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, (str, int, float)) and not isinstance(value, bool)
    )
    if not ok:
        raise UserError(f"{path}: {key} = {value!r} is not a {kind.__name__}")
    value = kind(value)
    if choices and value not in choices:
        raise UserError(f"{path}: {key} = {value!r}: use one of {', '.join(map(str, choices))}")
    return value


def parse_config(parser: argparse.ArgumentParser, config_class: type, argv: list[str] | None = None):
    """The configuration: each field's default, overridden by `--config FILE`, overridden by the flags given.

    Returns (config, given): `given` names the fields the file or the command line set."""
    namespace = parser.parse_args(argv)
    by_name = {}
    for attr, section in sections_of(config_class):
        for field, info, hint in section_fields(section):
            by_name[field.name] = (attr, field, info, hint)
            for alias in info.aliases:
                by_name[alias] = by_name[field.name]
    values: dict[str, Any] = {}
    if namespace.config:
        for key, value in read_config_file(namespace.config).items():
            if key not in by_name:
                raise UserError(
                    f"{namespace.config}: unknown setting {key!r}; keys are the trainer's flag names"
                )
            attr, field, info, hint = by_name[key]
            values[field.name] = _coerce(namespace.config, key, value, hint, info.choices)
    for key, value in vars(namespace).items():
        if key in by_name:
            values[key] = tuple(value) if isinstance(value, list) else value
    parts = {}
    for attr, section in sections_of(config_class):
        names = {f.name for f, _, _ in section_fields(section)}
        parts[attr] = section(**{k: v for k, v in values.items() if k in names})
    return config_class(**parts), frozenset(values)


def flat_values(config, include_secret: bool = False, include_per_run: bool = True) -> dict[str, Any]:
    """{flag name: value} of every field of a configuration made of sections."""
    out = {}
    for attr, section in sections_of(type(config)):
        part = getattr(config, attr)
        for field, info, _ in section_fields(section):
            if (info.secret and not include_secret) or (info.per_run and not include_per_run):
                continue
            out[field.name] = getattr(part, field.name)
    return out


def resume_values(config) -> dict[str, Any]:
    """{flag name: value} of the fields a resume must match (Flag.resume)."""
    out = {}
    for attr, section in sections_of(type(config)):
        for field, info, _ in section_fields(section):
            if info.resume:
                value = getattr(getattr(config, attr), field.name)
                out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and (value != value or value in (float("inf"), -float("inf"))):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)  # the shortest text that reads back as the same number
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON's string escapes are TOML's


def to_toml(values: dict[str, Any], header: str = "") -> str:
    """A flat TOML table (None values left out: they are the defaults)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"
