"""Command-line flags generated from the stage configs' fields, so that each setting is declared once.

A field declared with `gendertune.base.config.setting` (and not `flag=False`) becomes one option:
--kebab-case of its name, dest = the field's name, parsed as its annotation says (int, float, str;
a Literal's values as choices; tuples comma-separated; bool a switch), help = the field's help
plus the dataclass default. Every option defaults to None, "not given", so that
StageConfig.resolve keeps its order: defaults < config file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal

from gendertune.base.config import StageConfig


def flag_fields(config: type[StageConfig]) -> list[dataclasses.Field]:
    """The fields of `config` that are command-line flags."""
    return [field for field in dataclasses.fields(config) if field.metadata.get("flag", False)]


def flag_name(field: dataclasses.Field) -> str:
    flag = field.metadata["flag"]
    return flag if isinstance(flag, str) else "--" + field.name.replace("_", "-")


def shown_default(value: Any) -> str:
    """A default as the command line writes it: 1e-3 as 0.001, 10.0 as 10, tuples comma-separated."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(shown_default, value))
    return str(value)


def add_flags(
    parser: argparse.ArgumentParser,
    config: type[StageConfig],
    *,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
    required: Collection[str] = (),
) -> None:
    """One option per flag field of `config` (those named in `only`, less those in `skip`); the
    fields in `required` must be given."""
    hints = typing.get_type_hints(config)
    exclusive: dict[str, Any] = {}  # group name -> its argparse group
    for field in flag_fields(config):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        target: Any = parser
        if group := field.metadata["exclusive"]:
            if group not in exclusive:
                exclusive[group] = parser.add_mutually_exclusive_group()
            target = exclusive[group]
        target.add_argument(
            flag_name(field),
            dest=field.name,
            default=None,
            help=_help(field),
            required=field.name in required,
            **_parsing(config, field, hints[field.name]),
        )


def overrides(args: argparse.Namespace, config: type[StageConfig]) -> dict[str, Any]:
    """`config`'s flag fields as the command line gave them (None = not given), for StageConfig.resolve."""
    return {field.name: getattr(args, field.name) for field in flag_fields(config) if hasattr(args, field.name)}


def _help(field: dataclasses.Field) -> str:
    notes = []
    if names := field.metadata["names"]:
        notes.append("known: " + ", ".join(names))
    # A switch's default says itself (--x is off unless given; --x/--no-x shows both), and an empty
    # default (a path to give, an unset option) says nothing.
    if (
        field.default is not dataclasses.MISSING
        and not isinstance(field.default, bool)
        and field.default not in (None, "", ())
    ):
        notes.append(f"default {shown_default(field.default)}")
    text = field.metadata["help"] + (f" ({'; '.join(notes)})" if notes else "")
    return text.replace("%", "%%")  # argparse formats help with %


def _parsing(config: type[StageConfig], field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """add_argument's type/action/choices for a field's annotation."""
    options: dict[str, Any] = {"metavar": field.metadata["metavar"]} if field.metadata["metavar"] else {}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `str | None`: None is "not given" already
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    origin = typing.get_origin(hint)
    if field.metadata["repeat"]:
        return {**options, "action": "append"}
    if hint is bool:
        # A setting that is on by default needs a way to turn it off: --x / --no-x.
        return {**options, "action": argparse.BooleanOptionalAction if field.default is True else "store_true"}
    if origin is Literal:
        values = typing.get_args(hint)
        return {**options, "choices": values, "type": type(values[0])}
    if origin is tuple:
        return {**options, "type": _comma_separated(typing.get_args(hint)[0])}
    if hint in (int, float, str):
        return {**options, "type": hint}
    raise TypeError(f"{config.__name__}.{field.name}: no command-line form for {hint}; declare it with flag=False")


_KINDS = {int: "whole numbers", float: "numbers", str: "names"}


def _comma_separated(item: type) -> Callable[[str], tuple]:
    """`0.8,0.2` -> (0.8, 0.2), empty parts dropped as a config file's comma-separated text is."""

    def parse(text: str) -> tuple:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {_KINDS[item]}, got {text!r}") from None

    return parse
