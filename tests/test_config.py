"""Typed configs: unknown or mistyped keys are errors naming the key and the file."""
import pytest

from keyetron.config import ConfigError
from keyetron.model import KeyeConfig, load_model_config


def test_named_configs_load():
    assert load_model_config("keye-8b").text.num_layers == 36
    assert load_model_config("small").name == "small"


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("text:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"m.yaml.text: unknown key\(s\) \['hiden_size'\]"):
        load_model_config(f)


def test_mistyped_value_names_key_and_file(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("vision:\n  num_layers: two\n")
    with pytest.raises(ConfigError, match=r"m.yaml.vision.num_layers: expected an integer, got str 'two'"):
        load_model_config(f)


def test_invalid_combination_is_reported_with_the_file(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("text:\n  head_dim: 64\n")
    with pytest.raises(ConfigError, match=r"m.yaml.text: mrope_section \[16, 24, 24\] must sum to head_dim/2 = 32"):
        load_model_config(f)


def test_missing_file_and_unknown_name():
    with pytest.raises(ConfigError, match="not found"):
        load_model_config("/no/such/model.yaml")
    with pytest.raises(ConfigError, match="unknown model config 'giant'"):
        load_model_config("giant")


def test_defaults_are_keye_8b():
    assert KeyeConfig().text == load_model_config("keye-8b").text
