"""Recipes and the train CLI: every shipped recipe parses; typos and bad values are errors that say the fix."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ldmkit import LDMKitError
from ldmkit.cli import main
from ldmkit.cli.train import add_train_parser, run_train
from ldmkit.training.recipe import (
    AutoencoderRecipe,
    LDMRecipe,
    apply_override,
    build_recipe,
    load_recipe,
    parse_value,
)
from training_utils import ldm_dict, write_yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    import yaml

    kind = yaml.safe_load(path.read_text())["kind"]
    recipe = load_recipe(kind, path)
    assert isinstance(recipe, AutoencoderRecipe if kind == "autoencoder" else LDMRecipe)


def ae_dict(tmp_path, **extra) -> dict:
    return {"output_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path)}, **extra}


def test_defaults_and_floats_written_as_yaml_strings(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", {**ae_dict(tmp_path), "train": {"lr": "1e-4"}})
    recipe = load_recipe("autoencoder", path)
    assert recipe.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string; the recipe takes it as a number
    path.write_text(path.read_text() + "  mixed_precision: no\n")
    assert load_recipe("autoencoder", path).train.mixed_precision == "no"  # and a bare no as false
    assert recipe.model.type == "kl" and recipe.train.mixed_precision == "auto"


@pytest.mark.parametrize("data, key, suggestion", [
    ({"trian": {}}, "'trian'", "'train'"),
    ({"train": {"lrr": 1e-3}}, "'lrr'", "'lr'"),
    ({"train": {"ema": {"decai": 0.9}}}, "'decai'", "'decay'"),
    ({"data": {"root": "x", "resolutoin": 64}}, "'resolutoin'", "'resolution'"),
    ({"model": {"block_out_channel": [8]}}, "'block_out_channel'", "'block_out_channels'"),
])
def test_unknown_keys_name_the_nearest_valid_key(tmp_path, data, key, suggestion):
    merged = ae_dict(tmp_path)
    for section, value in data.items():
        merged[section] = {**merged.get(section, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(LDMKitError) as err:
        build_recipe("autoencoder", merged)
    assert key in str(err.value) and f"Did you mean {suggestion}" in str(err.value)


def test_override_typos_are_caught_like_yaml_typos(tmp_path):
    with pytest.raises(LDMKitError, match="unknown key 'max_step'.*Did you mean 'max_steps'"):
        build_recipe("autoencoder", ae_dict(tmp_path), ["train.max_step=10"])
    recipe = build_recipe("autoencoder", ae_dict(tmp_path), ["train.max_steps=10", "train.lr=2e-4",
                                                             "model.block_out_channels=[32, 64]"])
    assert (recipe.train.max_steps, recipe.train.lr, recipe.model.block_out_channels) == (10, 2e-4, [32, 64])


@pytest.mark.parametrize("override, message", [
    ("model.type=kll", "'kll' is not one of 'kl', 'vq'. Did you mean 'kl'"),
    ("train.max_steps=ten", "train: max_steps: expected an integer"),
    ("train.max_steps=0", "train.max_steps must be at least 1"),
    ("train.mixed_precision=fp8", "is not one of 'auto', 'no', 'bf16', 'fp16'"),
    ("train.adam_betas=[0.9]", "adam_betas must be two numbers"),
    ("data.resolution=30", "not a multiple of the autoencoder's downsampling factor 8"),
    ("model.norm_num_groups=24", "not multiples of model.norm_num_groups=24"),
    ("train.random_flip=true", "unknown key 'random_flip'"),
])
def test_bad_values_are_explained(tmp_path, override, message):
    base = ae_dict(tmp_path, model={"block_out_channels": [32, 32, 32, 32]})
    with pytest.raises(LDMKitError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build_recipe("autoencoder", base, [override])


def test_required_keys_and_kind(tmp_path):
    with pytest.raises(LDMKitError, match="data.root is missing"):
        build_recipe("autoencoder", {"output_dir": "x"})
    with pytest.raises(LDMKitError, match="output_dir is missing.*--output-dir"):
        build_recipe("autoencoder", {"data": {"root": "x"}})
    with pytest.raises(LDMKitError, match="required key 'autoencoder'"):
        build_recipe("ldm", ae_dict(tmp_path))
    with pytest.raises(LDMKitError, match="is a 'ldm' recipe but was given to `train autoencoder`"):
        build_recipe("autoencoder", {**ae_dict(tmp_path), "kind": "ldm"})
    with pytest.raises(LDMKitError, match="does not exist"):
        load_recipe("ldm", tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(LDMKitError, match="not valid YAML"):
        load_recipe("ldm", tmp_path / "bad.yaml")


def test_ldm_recipe_checks(tmp_path):
    base = ldm_dict(tmp_path, tmp_path / "ae", tmp_path / "out")
    assert build_recipe("ldm", base).text.max_length == 77
    with pytest.raises(LDMKitError, match="attention_levels has 3 entries"):
        build_recipe("ldm", base, ["unet.attention_levels=[true, true, false]"])
    with pytest.raises(LDMKitError, match="caption_dropout must be in"):
        build_recipe("ldm", base, ["text.caption_dropout=1.5"])
    with pytest.raises(LDMKitError, match="unknown key 'conditoning'.*'conditioning'"):
        build_recipe("ldm", {**base, "conditoning": "text"})


def test_parse_value_and_override_syntax():
    assert parse_value("1e-4") == 1e-4 and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("null") is None and parse_value("abc") == "abc"
    data: dict = {}
    apply_override(data, "train.ema.decay=0.99")
    assert data == {"train": {"ema": {"decay": 0.99}}}
    with pytest.raises(LDMKitError, match="must look like section.key=value"):
        apply_override(data, "train.lr")


def test_cli_parser_and_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="ldmkit")
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    args = parser.parse_args(["train", "ldm", "--config", "r.yaml", "--resume", "latest", "--output-dir", "o",
                              "--set", "train.lr=1e-3", "train.max_steps=3"])
    assert args.func is run_train and args.train_kind == "ldm" and args.resume == "latest"
    assert args.overrides == ["train.lr=1e-3"] and args.dotted == ["train.max_steps=3"]
    path = write_yaml(tmp_path / "r.yaml", {**ae_dict(tmp_path), "trian": {}})
    assert main(["train", "autoencoder", "--config", str(path)]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err
