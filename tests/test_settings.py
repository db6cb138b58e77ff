"""The expert/ROI sub-configs: typed, stored one way, and changed for a run only through `config.Settings`."""

from __future__ import annotations

import json
import subprocess

import pytest
from pydantic import ValidationError

from assistant.cli import build_parser, main
from assistant.config import AssistantConfig, ExpertConfig, RoiConfig, Settings, SettingsError
from assistant.defaults import default_model_path
from assistant.engine import LocalEngine
from assistant.serve.cli import server_command
from tests.helpers import defect_image


def test_sub_configs_are_typed_objects_saved_as_plain_json(tmp_path):
    config = AssistantConfig(roi={"max_boxes": 3}, decision={"threshold": 0.25})
    assert isinstance(config.roi, RoiConfig) and isinstance(config.expert, ExpertConfig)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["roi"]["max_boxes"] == 3 and saved["decision"]["threshold"] == 0.25
    loaded = AssistantConfig.from_pretrained(tmp_path)
    assert loaded.roi == config.roi and loaded.expert == config.expert and loaded.decision == config.decision
    with pytest.raises(ValidationError, match="frozen"):
        loaded.roi.enabled = False  # changed only through Settings


@pytest.mark.skipif(default_model_path() is None, reason="the bundled demo model is not installed")
def test_the_shipped_config_json_still_loads():
    config = AssistantConfig.from_pretrained(default_model_path())
    assert isinstance(config.roi, RoiConfig) and config.expert.feature_layers


def test_settings_change_only_what_they_name_and_are_validated_as_a_whole():
    config = AssistantConfig(roi={"max_boxes": 3})
    config.apply_settings(Settings.parse(["roi.enabled=false", "decision.threshold=0.4"]))
    assert (config.roi.enabled, config.roi.max_boxes, config.decision.threshold) == (False, 3, 0.4)
    config.update({"roi": {"pool": 1}})  # transformers' and vLLM's route (`--hf-overrides`) is the same one
    assert (config.roi.pool, config.roi.max_boxes, config.roi.enabled) == (1, 3, False)
    with pytest.raises(SettingsError, match=r"^expert: suspicion_thresholds must satisfy"):
        config.apply_settings(Settings.parse(["expert.suspicion_thresholds=[0.8, 0.2]"]))


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("roi.enabeld=false", r"^roi\.enabeld: Extra inputs are not permitted$"),
        ("rio.enabled=false", r"^rio: Extra inputs are not permitted$"),
        ("roi.max_boxes=0", r"^roi\.max_boxes: Input should be greater than or equal to 1$"),
        ("roi.map_source=clip", r"^roi\.map_source: Input should be 'expert' or 'external'$"),
        ("decision.threshold=high", r"^decision\.threshold: Input should be a valid number"),
        ("roi", r"expected SECTION\.KEY=VALUE"),
        ("roi.enabled=", r"expected SECTION\.KEY=VALUE"),
    ],
)
def test_unknown_keys_and_wrong_values_name_their_key_path(assignment, message):
    with pytest.raises(SettingsError, match=message):
        Settings.parse([assignment])


def test_the_cli_applies_settings_and_reports_bad_ones_in_one_line(tiny_path, image_file, capsys):
    assert main(["inspect", image_file, "--model", str(tiny_path), "--set", "roi.enabeld=false"]) == 2
    assert capsys.readouterr().err == "error: roi.enabeld: Extra inputs are not permitted\n"
    argv = ["inspect", image_file, "--model", str(tiny_path), "--json", "--max-new-tokens", "1"]
    assert main([*argv, "--set", "decision.threshold=0.0"]) == 0
    assert json.loads(capsys.readouterr().out)["anomalous"] is True  # every score is >= 0
    assert main([*argv, "--set", "decision.threshold=1.0", "--set", "decision.bias=-50"]) == 0
    assert json.loads(capsys.readouterr().out)["anomalous"] is False


def test_settings_are_refused_for_an_endpoint(image_file, capsys):
    argv = ["inspect", image_file, "--endpoint", "http://127.0.0.1:9/v1", "--served-model", "m", "--set", "roi.pool=1"]
    assert main(argv) == 2  # refused before any request: a server's settings are its own
    assert "serve --set" in capsys.readouterr().err


def test_an_engine_reads_settings_once_at_load(tiny_path):
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu", settings=Settings(roi={"enabled": False}))
    assert engine.model.config.roi.enabled is False and engine.processor.config is engine.model.config
    assert "roi_pixel_values" not in engine.processor.preprocess_images([[defect_image()]])


def test_serve_passes_settings_to_vllm_as_hf_overrides():
    args = build_parser().parse_args(["serve", "--model", "m", "--set", "roi.enabled=false"])
    command = server_command(args, "/models/m", "python", cpu=True)
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides == {"expert": {}, "roi": {"enabled": False}, "decision": {}, "reference": {}}
    plain = server_command(build_parser().parse_args(["serve", "--model", "m"]), "/models/m", "python", cpu=True)
    assert "--hf-overrides" not in plain


VLLM_CONFIG = """
import json, sys
from vllm.plugins import load_general_plugins
from vllm.config import ModelConfig
load_general_plugins()
config = ModelConfig(model=sys.argv[1], hf_overrides=json.loads(sys.argv[2])).hf_config
print(json.dumps({"type": type(config).__name__, "roi": config.roi.model_dump()}))
"""


def test_vllm_applies_the_overrides_onto_the_checkpoints_sub_config(serving_python, tiny_path, tmp_path):
    overrides = json.dumps({"expert": {}, "roi": {"enabled": False}})
    result = subprocess.run(
        [serving_python, "-c", VLLM_CONFIG, str(tiny_path), overrides],
        capture_output=True, text=True, check=True, cwd=tmp_path, env={"VLLM_PLUGINS": "anomaly_assistant"},
    )  # fmt: skip
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    saved = AssistantConfig.from_pretrained(tiny_path).roi
    assert seen == {"type": "AssistantConfig", "roi": saved.model_copy(update={"enabled": False}).model_dump()}
