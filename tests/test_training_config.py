"""Training configs: every shipped YAML parses, typos and wrong types are errors naming their key path, overrides
work, `model.settings` reaches the model, configs round-trip."""

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from pydantic import ValidationError

from training.config import (
    ConfigError,
    ExpertTrainConfig,
    InstructTrainConfig,
    ModelSource,
    load_config,
    parse_config,
    save_config,
)
from training.models import load_assistant

CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))
ACCELERATE = sorted((Path(__file__).parents[1] / "training" / "accelerate").glob("*.yaml"))
INSTRUCT = {"model": {"tiny": True}, "data": {"json_path": "a"}}
EXPERT = {"model": {"tiny": True}, "data": {"folders": [{"root": "r", "layout": "visa"}]}}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_round_trip(path, tmp_path):
    config = load_config(path)
    assert config.stage == yaml.safe_load(path.read_text())["stage"]
    saved = save_config(config, tmp_path)
    assert load_config(saved) == config


def test_a_saved_config_loads_back_equal(tmp_path):
    data = {
        "model": {"path": "ckpt", "settings": {"roi": {"enabled": False}, "decision": {"threshold": 0.4}}},
        "data": {
            "folders": [{"root": "r", "layout": "visa", "split": "test", "categories": ["pcb1"]}],
            "synthesize": {"categories": ["pill"], "size": 56},
        },
        "run": {"max_steps": 3, "max_grad_norm": None, "mixed_precision": "bf16"},
        "optim": {"betas": [0.8, 0.9]},
    }
    config = parse_config(data, "expert")
    assert config.optim.betas == (0.8, 0.9) and config.data.synthesize.size == 56
    loaded = load_config(save_config(config, tmp_path))
    assert isinstance(loaded, ExpertTrainConfig)
    assert loaded == config
    assert loaded.model.settings.changes("roi") == {"enabled": False}


def test_shipped_accelerate_configs_are_valid():
    kinds = {load_config_from_file(str(path)).distributed_type.value for path in ACCELERATE}
    assert kinds == {"DEEPSPEED", "FSDP", "MULTI_GPU"}  # MULTI_GPU: cpu_ddp.yaml, the CPU run of the tests


def test_values_types_and_overrides():
    data = {**INSTRUCT, "optim": {"lr": "1e-4"}}
    overrides = ["run.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "run.output_dir=out", "optim.eps=1e-6"]
    config = parse_config(data, "instruct", overrides)
    assert data["optim"] == {"lr": "1e-4"}  # the caller's mapping is left as it was
    assert isinstance(config, InstructTrainConfig)
    assert config.optim.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string
    assert config.run.max_steps == 7 and config.run.output_dir == "out"
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.optim.betas == (0.9, 0.999) and config.optim.eps == 1e-6


def test_each_stage_has_its_own_section_defaults():
    instruct, expert = parse_config(INSTRUCT, "instruct"), parse_config(EXPERT, "expert")
    assert instruct.optim.lr == 2e-4 and instruct.schedule.warmup_ratio == 0.03
    assert expert.optim.lr == 1e-4 and expert.schedule.name == "cosine_with_restarts"
    assert not expert.model.settings  # empty: the checkpoint's own expert/ROI sub-configs


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({**INSTRUCT, "run": {"max_step": 3}}, [], "^run.max_step: Extra inputs are not permitted$"),
        (INSTRUCT, ["optim.lrr=1e-3"], "^optim.lrr: Extra inputs are not permitted$"),
        (INSTRUCT, ["run.batch_size=many"], "^run.batch_size: Input should be a valid integer"),
        ({**INSTRUCT, "run": {"batch_size": "two"}}, [], "^run.batch_size: Input should be a valid integer"),
        (INSTRUCT, ["run.grad_accum=0"], "^run.grad_accum: Input should be greater than or equal to 1$"),
        (INSTRUCT, ["run.epochs=0"], "^run: give max_steps or epochs > 0$"),
        (INSTRUCT, ["schedule.name=wavy"], "^schedule.name: Input should be 'cosine', 'cosine_with_restarts', "),
        (INSTRUCT, ["optim.betas=[0.9]"], "^optim.betas.1: Field required$"),
        (INSTRUCT, ["data.synthesize={sise: 3}"], "^data.synthesize.sise: Unexpected keyword argument$"),
        ({"model": {}, "data": {"json_path": "a"}}, [], "^model: give exactly one of `path` or `tiny: true`$"),
        ({"model": {"tiny": True}, "data": {}}, [], "^data: give exactly one of `json_path` or `mixture`$"),
        ({"data": {"json_path": "a"}}, [], "^model: Field required$"),
        (INSTRUCT, ["run.max_steps"], "expected section.key=value"),
        (INSTRUCT, ["model.settings.rio={enabled: false}"], r"^model.settings.rio: Extra inputs are not permitted$"),
        (INSTRUCT, ["model.settings.roi={enabeld: false}"], r"^model.settings.roi.enabeld: Extra inputs"),
        (INSTRUCT, ["model.settings.roi={max_boxes: 0}"], r"^model.settings.roi.max_boxes: Input should be greater"),
    ],
)
def test_config_errors_name_the_key_path(data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "instruct", overrides)


@pytest.mark.parametrize(
    "folder, message",
    [
        ({"root": "r", "layot": "visa"}, "^data.folders.1.layot: Extra inputs are not permitted$"),
        ({"root": "r", "layout": "vis"}, "^data.folders.1.layout: Input should be 'mvtec' or 'visa'$"),
        ({"layout": "visa"}, "^data.folders.1.root: Field required$"),
    ],
)
def test_errors_deep_inside_name_the_key_path(folder, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**EXPERT, "data": {"folders": [{"root": "ok"}, folder]}}, "expert")


def test_stage_mismatch_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: expert\nmodel: {tiny: true}\ndata: {folders: []}\n")
    with pytest.raises(ConfigError, match="this is a 'expert' config, not a 'instruct' one"):
        load_config(path, "instruct")


def test_model_settings_reach_the_loaded_model(tiny_path):
    """`model.settings` from the YAML changes the loaded model's sub-configs (tiny model and checkpoint folder)."""
    assert load_assistant(ModelSource(tiny=True))[0].config.roi.enabled is True
    config = parse_config({**INSTRUCT, "model": {"tiny": True, "settings": {"roi": {"enabled": False}}}}, "instruct")
    assert load_assistant(config.model)[0].config.roi.enabled is False
    settings = {"roi": {"enabled": False}, "decision": {"threshold": 0.25}}
    model, _ = load_assistant(ModelSource(path=str(tiny_path), settings=settings))
    assert model.config.roi.enabled is False and model.config.decision.threshold == 0.25


def test_a_yaml_that_is_not_a_mapping_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- stage: expert\n")
    with pytest.raises(ConfigError, match="^config: expected a mapping of sections, got list$"):
        load_config(path)


def test_configs_are_frozen():
    """The config saved with a checkpoint is the one that ran."""
    config = parse_config(INSTRUCT, "instruct")
    with pytest.raises(ValidationError, match="frozen"):
        config.run.batch_size = 3


@pytest.mark.parametrize(("saved", "enabled"), [(None, True), (False, False)])
def test_a_config_saved_before_model_settings_still_loads(saved, enabled):
    """Adapters trained earlier carry `model.roi` in their train_config.yaml; `train merge` must still read it."""
    config = parse_config({"model": {"tiny": True, "roi": saved}, "data": {"json_path": "a"}}, "instruct")
    model, _ = load_assistant(config.model)
    assert model.config.roi.enabled is enabled
