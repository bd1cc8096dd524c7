"""Typed, validated stage configs: defaults < config file < CLI flags.

Each stage declares a dataclass that subclasses `StageConfig`. A config file (JSON or TOML)
holds one section per stage, e.g. `{"prep": {"image_size": 96}}`. Unknown sections and keys are
rejected rather than ignored: a typo in a config file silently falling back to a default is the
classic way a tuning run ends up measuring something other than what its author meant.

Fields are declared with `setting`, which keeps a setting's help next to its default; the command
line's flags are generated from those fields (gendertune.base.flags), so each is written once.
A numeric setting's range is declared there too, in interval notation (`bounds="(0, 10)"`,
`"[1, inf)"`), and checked here for every stage, before the stage's own `validate`: every float
(and every float in a tuple) must also be finite, so NaN and inf never reach a comparison that
would let them through, or a config.json that JSON cannot hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from gendertune.base.errors import UserInputError

# Every stage's section name; a config file section outside this list is a typo.
SECTIONS = ("prep", "train", "search", "compare")


class ConfigError(UserInputError):
    """A config value is missing, unknown, of the wrong type, or impossible."""


# "(0, 10)", "[1, inf)", "[-1, 1]": ( ) exclude their end, [ ] include it.
_BOUNDS = re.compile(r"^([\[(])\s*(-?(?:inf|[0-9.e+-]+))\s*,\s*(-?(?:inf|[0-9.e+-]+))\s*([\])])$")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A numeric setting's allowed interval, written as in mathematics: `Bounds.parse("(0, 1]")`."""

    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Bounds:
        match = _BOUNDS.match(text.strip())
        if not match:
            raise ValueError(f"bounds {text!r}: write an interval such as '(0, 10)' or '[1, inf)'")
        opening, low, high, closing = match.groups()
        return cls(text, float(low), float(high), opening == "[", closing == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


# numpy's and Optuna's seeds are unsigned 32-bit: a negative seed fails only when the stage uses it.
SEED_BOUNDS = "[0, 4294967295]"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: bool | str = True,
    names: Sequence[str] = (),
    exclusive: str = "",
    repeat: bool = False,
    metavar: str = "",
    bounds: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its help text: `lr: float = setting(1e-3, help="peak learning rate", bounds="(0, 10)")`.

    flag: True = also a command-line flag, --kebab-case of the field's name; a string = the flag's
    name; False = a config-file setting only. names: the values it accepts, listed in the help
    (validate checks them). exclusive: flags sharing this name cannot be given together. repeat: a
    tuple given by repeating the flag (NAME=DIR sets) rather than as comma-separated values.
    bounds: the interval a number (or each number of a tuple) must lie in, checked before validate.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "names": tuple(names),
        "exclusive": exclusive,
        "repeat": repeat,
        "metavar": metavar,
        "bounds": Bounds.parse(bounds) if bounds else None,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a JSON or TOML config file into `{section: {key: value}}`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"config file {path}: use a .json or .toml file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is no part of the TOML
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err}); save it as UTF-8") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f'config file {path}: expected sections like {{"prep": {{...}}}}')
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
        self.check_numbers()
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is impossible (beyond its declared bounds)."""

    def check_numbers(self) -> None:
        """Every float finite, every number inside its field's declared bounds."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            numbers = value if isinstance(value, tuple) else (value,)
            for number in numbers:
                if isinstance(number, bool) or not isinstance(number, (int, float)):
                    continue
                if not math.isfinite(number):
                    raise ConfigError(f"{self.section}.{field.name}: must be a finite number, got {number}")
                bounds = field.metadata.get("bounds")
                if bounds is not None and number not in bounds:
                    raise ConfigError(f"{self.section}.{field.name}: must be in {bounds.text}, got {number}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Self:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown {cls.section} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
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

    @classmethod
    def with_new_defaults(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved section (a config.json's, as JSON) with each setting it lacks at its default: a
        setting that a newer gendertune added counts as its default, so an unfinished run saved by
        an older version still resumes with the same flags."""
        filled = dict(saved)
        for field in dataclasses.fields(cls):
            if field.name in filled:
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                continue
            filled[field.name] = json.loads(json.dumps(default))  # as to_json writes it (tuples as lists)
        return filled

    def to_json(self) -> str:
        # allow_nan=False: a value check that let NaN through fails here, not in every later reader.
        return json.dumps({self.section: self.to_dict()}, indent=2, sort_keys=True, allow_nan=False) + "\n"
