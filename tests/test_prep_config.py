"""Tests for gendertune.data_prep.config (PrepConfig): the prep stage config's validation and its precedence
(defaults < file < flags)."""

from __future__ import annotations

import json

import pytest

from gendertune.base.config import ConfigError
from gendertune.data_prep.config import PrepConfig


def test_config_rejects_unknown_keys_and_impossible_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown prep setting\\(s\\) imagesize"):
        PrepConfig.from_dict({"data": "d", "out": "o", "imagesize": 64})
    with pytest.raises(ConfigError, match="sum to 1"):
        PrepConfig.from_dict({"data": "d", "out": "o", "ratios": [0.8, 0.3]})
    with pytest.raises(ConfigError, match="2 \\(train,test\\) or 3"):
        PrepConfig.from_dict({"data": "d", "out": "o", "ratios": [1.0]})
    with pytest.raises(ConfigError, match="prep.image_size: expected a whole number"):
        PrepConfig.from_dict({"data": "d", "out": "o", "image_size": "big"})
    with pytest.raises(ConfigError, match="prep.split: 'kfold' is not one of"):
        PrepConfig.from_dict({"data": "d", "out": "o", "split": "kfold"})
    with pytest.raises(ConfigError, match=r"prep.image_size: must be in \[16, 1024\], got 8"):
        PrepConfig.from_dict({"data": "d", "out": "o", "image_size": 8})


def test_config_precedence_defaults_file_flags(tmp_path):
    path = tmp_path / "gt.toml"
    path.write_text("[prep]\nimage_size = 96\nseed = 3\nratios = [0.7, 0.15, 0.15]\n")
    config = PrepConfig.resolve(config_file=path, overrides={"data": "d", "out": "o", "seed": 5, "split": None})
    assert (config.image_size, config.seed, config.ratios, config.split) == (96, 5, (0.7, 0.15, 0.15), "random")
    assert json.loads(config.to_json())["prep"]["image_size"] == 96
    bad = tmp_path / "bad.json"
    bad.write_text('{"prep": {"image_size": 64}, "trian": {}}')
    with pytest.raises(ConfigError, match="unknown section\\(s\\) trian"):
        PrepConfig.resolve(config_file=bad, overrides={"data": "d", "out": "o"})


def test_faces_are_framed_tighter_than_celeba_by_default():
    """1.4: UTKFace-style tight crops and CelebA chips look alike (docs/results.md, issue 22)."""
    from gendertune.data_prep.faces import template_points

    settings = PrepConfig.from_dict({"data": "d", "out": "o"}).align_settings()
    assert settings.zoom == 1.4
    tight, celeba = template_points(64, settings.zoom), template_points(64, 1.0)
    eye_span = lambda points: points[3, 0] - points[0, 0]  # noqa: E731  outer eye corners
    assert eye_span(tight) == pytest.approx(1.4 * eye_span(celeba))
