"""Typed, validated stage configs: defaults < config file < CLI flags.

Each stage declares a dataclass that subclasses `StageConfig`. A config file (JSON or TOML)
holds one section per stage, e.g. `{"prep": {"image_size": 96}}`. Unknown sections and keys are
rejected rather than ignored: a typo in a config file silently falling back to a default is the
classic way a tuning run ends up measuring something other than what its author meant.

Fields are declared with `setting`, which keeps a setting's help next to its default; the command
line's flags are generated from those fields (gendertune.base.flags), so each is written once.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Self

from gendertune.base.errors import UserInputError


# Every stage's section name; a config file section outside this list is a typo.
SECTIONS = ("prep", "train", "search", "compare")


class ConfigError(UserInputError):
    """A config value is missing, unknown, of the wrong type, or impossible."""


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: bool | str = True,
            names: Sequence[str] = (), exclusive: str = "", repeat: bool = False, metavar: str = "",
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text: `lr: float = setting(1e-3, help="peak learning rate")`.

    flag: True = also a command-line flag, --kebab-case of the field's name; a string = the flag's
    name; False = a config-file setting only. names: the values it accepts, listed in the help
    (validate checks them). exclusive: flags sharing this name cannot be given together. repeat: a
    tuple given by repeating the flag (NAME=DIR sets) rather than as comma-separated values.
    """
    metadata = {"help": help, "flag": flag, "names": tuple(names), "exclusive": exclusive, "repeat": repeat,
                "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a JSON or TOML config file into `{section: {key: value}}`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path}: use a .json or .toml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"config file {path}: expected sections like {{\"prep\": {{...}}}}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return data


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check `value` against a simple type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        item_hint = typing.get_args(hint)[0]
        return tuple(_coerce(name, v, item_hint) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table/mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, hint) and not isinstance(value, bool):
            return value
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                pass
        kind = "a whole number" if hint is int else "a number"
        raise ConfigError(f"{name}: expected {kind}, got {value!r}")
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name}: expected text, got {value!r}")
        return str(value)
    return value


@dataclasses.dataclass
class StageConfig:
    """Base for stage configs. Subclasses set `section` and override `validate`, which runs whenever
    one is constructed: directly, by `from_dict`/`resolve` (after merging file and flags), or by
    `dataclasses.replace`."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # A config built in Python (the API, a notebook) is checked like one read from a file: each value
        # against its field's type (lists become tuples, "1e-3" a float), then the stage's own rules.
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            setattr(self, field.name, _coerce(f"{self.section}.{field.name}", value, hints[field.name]))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is impossible."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Self:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown {cls.section} setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(fields))}"
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{source}: {cls.section} needs {', '.join(missing)}")
        return cls(**values)  # __post_init__ coerces and validates

    @classmethod
    def resolve(cls, *, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Self:
        """Defaults, then the file's section for this stage, then CLI overrides (None = not given)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            sections = load_config_file(config_file)
            values.update(sections.get(cls.section, {}))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values, source=str(config_file) if config_file else "command line")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps({self.section: self.to_dict()}, indent=2, sort_keys=True) + "\n"
