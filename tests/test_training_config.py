"""Training configs: every shipped YAML parses, typos are errors, overrides work, configs round-trip."""

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from training.config import ConfigError, InstructTrainConfig, load_config, parse_config, save_config

CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))
ACCELERATE = sorted((Path(__file__).parents[1] / "training" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_round_trip(path, tmp_path):
    config = load_config(path)
    assert config.stage == yaml.safe_load(path.read_text())["stage"]
    saved = save_config(config, tmp_path)
    assert load_config(saved) == config


def test_shipped_accelerate_configs_are_valid():
    kinds = {load_config_from_file(str(path)).distributed_type.value for path in ACCELERATE}
    assert kinds == {"DEEPSPEED", "FSDP"}


def test_values_types_and_overrides():
    data = {"model": {"tiny": True}, "data": {"json_path": "a.json"}, "optim": {"lr": "1e-4"}}
    config = parse_config(
        data, "instruct", ["run.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "run.output_dir=out"]
    )
    assert isinstance(config, InstructTrainConfig)
    assert config.optim.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string
    assert config.run.max_steps == 7 and config.run.output_dir == "out"
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.optim.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        (
            {"model": {"tiny": True}, "data": {"json_path": "a"}, "run": {"max_step": 3}},
            [],
            r"run: unknown key\(s\) \['max_step'\]",
        ),
        (
            {"model": {"tiny": True}, "data": {"json_path": "a"}},
            ["run.batch_size=many"],
            r"run.batch_size: expected int, got 'many'",
        ),
        (
            {"model": {"tiny": True}, "data": {"json_path": "a"}},
            ["schedule.name=wavy"],
            r"schedule.name: 'wavy' is not one of",
        ),
        ({"model": {}, "data": {"json_path": "a"}}, [], "give exactly one of `path` or `tiny: true`"),
        ({"model": {"tiny": True}, "data": {}}, [], "give exactly one of `json_path` or `mixture`"),
        ({"model": {"tiny": True}, "data": {"json_path": "a"}}, ["run.max_steps"], "expected section.key=value"),
    ],
)
def test_config_errors_name_the_key(data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "instruct", overrides)


def test_stage_mismatch_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: expert\nmodel: {tiny: true}\ndata: {folders: []}\n")
    with pytest.raises(ConfigError, match="this is a 'expert' config, not a 'instruct' one"):
        load_config(path, "instruct")
