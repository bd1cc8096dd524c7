"""The stage flags are generated from the config dataclasses (gendertune.base.flags): a setting is
declared once, with its help and default, becomes a flag parsed as its annotation says, and still
resolves defaults < config file < flags. And the commands' parsers offer exactly those flags."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from typing import Literal

import pytest

from gendertune import cli
from gendertune.base import flags
from gendertune.base.config import StageConfig, setting
from gendertune.data_prep.config import PrepConfig
from gendertune.models.registry import list_models
from gendertune.models.transforms import AUGMENTATIONS
from gendertune.tuning.compare.config import CompareConfig
from gendertune.tuning.search.config import SearchConfig
from gendertune.tuning.train.config import TrainConfig


@dataclasses.dataclass
class WidgetConfig(StageConfig):
    section = "prep"  # a config file's sections are checked against the real stages'

    widgets: int = setting(3, help="how many widgets")
    shape: Literal["round", "square"] = setting("round", help="their shape")
    sizes: tuple[float, ...] = setting((0.5, 1.5), help="their sizes")
    label: str | None = setting(None, help="a label")
    shiny: bool = setting(False, help="polish them")
    secret: int = setting(7, help="a config-file setting only", flag=False)


def widget_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="widgets")
    flags.add_flags(parser, WidgetConfig)
    return parser


def options(add_flags) -> set[str]:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return {option for action in parser._actions for option in action.option_strings}


def test_a_new_setting_is_a_flag_with_its_help_and_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    text = widget_parser().format_help()
    assert re.search(r"--widgets WIDGETS +how many widgets \(default 3\)\n", text), text
    assert "--shape {round,square}" in text and "their shape (default round)" in text
    assert "their sizes (default 0.5,1.5)" in text
    assert "a label\n" in text and "polish them\n" in text  # nothing to show for None and a switch
    assert "--secret" not in text


def test_flags_parse_as_their_annotation_and_default_to_not_given():
    parser = widget_parser()
    assert vars(parser.parse_args([])) == dict.fromkeys(["widgets", "shape", "sizes", "label", "shiny"])
    args = parser.parse_args(["--widgets", "5", "--shape", "square", "--sizes", "1, 2,", "--label", "x", "--shiny"])
    assert vars(args) == {"widgets": 5, "shape": "square", "sizes": (1.0, 2.0), "label": "x", "shiny": True}
    assert flags.overrides(args, WidgetConfig) == vars(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "oval"], "invalid choice: 'oval'"),
        (["--widgets", "many"], "invalid int value"),
        (["--sizes", "1,big"], "expected comma-separated numbers, got '1,big'"),
    ],
)
def test_a_bad_flag_value_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        widget_parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_generated_flag_beats_the_config_file_which_beats_the_default(tmp_path):
    config = tmp_path / "widgets.toml"
    config.write_text('[prep]\nwidgets = 4\nshape = "square"\nsecret = 8\n')
    parser = widget_parser()

    def resolve(argv):
        return WidgetConfig.resolve(
            config_file=config, overrides=flags.overrides(parser.parse_args(argv), WidgetConfig)
        )

    assert WidgetConfig.resolve(overrides=flags.overrides(parser.parse_args([]), WidgetConfig)).widgets == 3
    assert (resolve([]).widgets, resolve([]).shape, resolve([]).secret, resolve([]).sizes) == (
        4,
        "square",
        8,
        (0.5, 1.5),
    )
    assert (resolve(["--widgets", "5"]).widgets, resolve(["--widgets", "5"]).shape) == (5, "square")


@pytest.mark.parametrize("config", [PrepConfig, TrainConfig, SearchConfig, CompareConfig])
def test_every_setting_has_help(config):
    for field in dataclasses.fields(config):
        assert field.metadata.get("help", "").strip(), f"{config.__name__}.{field.name} has no help"


def test_the_config_file_only_settings_are_no_flags():
    config_only = {"momentum", "step_epochs", "step_gamma", "eval_batch_size", *AUGMENTATIONS}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {
        f.name for f in flags.flag_fields(TrainConfig)
    } == config_only
    assert {f.name for f in flags.flag_fields(PrepConfig)} == {f.name for f in dataclasses.fields(PrepConfig)} - {
        "rows_per_task"
    }
    assert {f.name for f in flags.flag_fields(SearchConfig)} == {f.name for f in dataclasses.fields(SearchConfig)} - {
        "space"
    }


def flag_names(*configs) -> set[str]:
    """Each flag field's option, and --no-X beside a switch that is on by default."""
    names = set()
    for config in configs:
        for field in flags.flag_fields(config):
            name = flags.flag_name(field)
            names |= {name, "--no-" + name[2:]} if field.default is True else {name}
    return names


HELP = {"-h", "--help"}


def test_each_stage_command_offers_exactly_its_configs_flags():
    assert options(cli.COMMANDS["prep"].add_flags) == flag_names(PrepConfig) | {"--config"} | HELP
    assert (
        options(cli.COMMANDS["train"].add_flags)
        == flag_names(TrainConfig) | {"--augment", "--config", "--mlflow"} | HELP
    )
    # compare: its own --data, --out and --models instead of the run's --model; one --seed for both seeds
    assert options(cli.COMMANDS["compare"].add_flags) == (
        flag_names(CompareConfig, SearchConfig, TrainConfig) - {"--model"}
        | {"--augment", "--config", "--mlflow"}
        | HELP
    )
    assert options(cli.COMMANDS["demo"].add_flags) == {"--out", "--data", "--labels"} | HELP


def test_the_model_flags_list_the_registry(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    for command, flag in (("train", "--model MODEL"), ("compare", "--models MODELS")):
        parser = argparse.ArgumentParser()
        cli.COMMANDS[command].add_flags(parser)
        line = next(line for line in parser.format_help().splitlines() if line.strip().startswith(flag))
        assert "known: " + ", ".join(list_models()) in line, line


def test_compare_seed_augment_and_the_weights_flags():
    parser = cli.build_parser(flags_for=["compare"])
    args = parser.parse_args(
        [
            "compare",
            "--data",
            "prep",
            "--out",
            "cmp",
            "--seed",
            "7",
            "--augment",
            "hflip=0.2",
            "--eval-set",
            "a=x",
            "--eval-set",
            "b=y",
        ]
    )
    compare, search, base = cli._compare_configs(args)
    assert (search.seed, base.seed, base.hflip, base.rotation) == (
        7,
        7,
        0.2,
        TrainConfig(data="prep", out="run").rotation,
    )
    assert (base.data, base.out, base.eval_sets) == ("prep", "cmp", ("a=x", "b=y"))
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["compare", "--pretrained", "--weights", "w.pt"])
    assert exited.value.code == 2


def test_only_the_command_run_builds_its_flags():
    """`gendertune leaderboard` or `jobs` must not import torch for the stage configs' flags, and no
    command's flags import Ray: the configs live apart from the stages."""
    code = (
        "import sys; from gendertune.cli import build_parser; "
        "build_parser(flags_for=['leaderboard']).parse_args(['leaderboard', 'x']); "
        "print(sorted({'torch', 'ray', 'gendertune.tuning.train.config'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    code = (
        "import sys; from gendertune.cli import build_parser; build_parser(flags_for=['compare', 'train', 'prep']); "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
