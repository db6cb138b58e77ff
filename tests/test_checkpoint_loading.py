"""One loader for every checkpoint kind: plain, composed (the shipped demo) and merged, for every consumer.

Inference (`LocalEngine`), training (`train instruct`), merge (`train merge` / `objective.merge`), export and the
server's image side all go through `checkpoint.load_checkpoint` / `load_image_side`.
"""

from __future__ import annotations

import json

import pytest
import torch

from assistant.checkpoint import BaseLLM, load_checkpoint, load_image_side, save_composed
from assistant.cli import main
from assistant.defaults import default_model_path
from assistant.engine import ImageAnalyzer, LocalEngine
from assistant.factory import tiny_assistant
from tests.helpers import defect_image, model_inputs
from training.config import LoraSettings
from training.lora import apply_lora

DEMO = default_model_path()


@pytest.fixture
def composed(tmp_path, monkeypatch):
    """A composed folder of a LoRA-trained tiny model whose base LLM 'package' is the untrained LLM."""
    model, processor = tiny_assistant(seed=5)
    base_llm = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("model.language_model.", "lm_"))}
    trained = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("ANOMALY_ASSISTANT_CACHE", str(tmp_path / "cache"))  # merged weights are cached there
    monkeypatch.setattr(BaseLLM, "state_dict", lambda self: base_llm)
    monkeypatch.setattr(BaseLLM, "gguf_folder", lambda self: tmp_path)
    return save_composed(trained, processor, BaseLLM("some_llm_package", "m.gguf"), tmp_path / "c", torch.float32)


def test_export_writes_the_composed_model_as_a_plain_folder(composed, tmp_path):
    assert main(["export", str(tmp_path / "plain"), "--model", str(composed)]) == 0
    (from_composed, processor), (from_plain, _) = load_checkpoint(composed), load_checkpoint(tmp_path / "plain")
    assert not (tmp_path / "plain" / "base_llm.json").exists()
    inputs = model_inputs(processor, [defect_image()], "Defect?")
    with torch.no_grad():
        torch.testing.assert_close(from_plain(**inputs).logits, from_composed(**inputs).logits)


def test_the_image_side_alone_gives_the_full_models_verdict(composed, tmp_path):
    assert main(["export", str(tmp_path / "plain"), "--model", str(composed)]) == 0
    image = defect_image(120, 160)
    expected = LocalEngine.from_pretrained(composed, device="cpu").analyze(image)
    for folder in (composed, tmp_path / "plain"):
        model, processor = load_checkpoint(folder)
        image_side, side_processor = load_image_side(folder, model.config)
        if folder != composed:
            assert not hasattr(image_side, "language_model")  # the plain folder's image modules only
        verdict = ImageAnalyzer(image_side, side_processor).decide(image, [], expected.llm_yes_probability)
        assert verdict.score == pytest.approx(expected.score, abs=1e-6)
        assert verdict.boxes == expected.boxes


def test_settings_are_applied_before_the_model_is_built(tiny_path):
    model, processor = load_checkpoint(tiny_path, settings=None)
    assert model.config.roi.enabled
    from assistant.config import Settings

    model, processor = load_checkpoint(tiny_path, settings=Settings(roi={"enabled": False}))
    assert model.config.roi.enabled is False and processor.config.roi.enabled is False
    assert "roi_pixel_values" not in processor.preprocess_images([[defect_image()]])


@pytest.mark.skipif(DEMO is None, reason="the bundled demo model is not installed")
def test_train_instruct_starts_from_the_shipped_demo_and_merges(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    records = []
    for index in range(2):
        defect_image(64, 64, seed=index, defect=bool(index)).save(root / f"{index}.png")
        turns = [{"from": "human", "value": "<image>\nAny defect?"}, {"from": "gpt", "value": "Yes" if index else "No"}]
        records.append({"id": f"s{index}", "image": f"{index}.png", "conversations": turns})
    (root / "train.json").write_text(json.dumps(records))
    settings = [
        "model.tiny=false", f"model.path={DEMO}", f"data.json_path={root / 'train.json'}", "data.image_root=null",
        "data.synthesize=null", f"run.output_dir={tmp_path / 'run'}", "run.max_steps=2", "run.batch_size=1",
        "run.checkpoint_every=0", "objective.merge=true",
    ]  # fmt: skip
    config = str(DEMO.parents[2] / "training" / "configs" / "tiny_instruct.yaml")
    assert main(["train", "instruct", "--config", config, *[f"--set={s}" for s in settings]]) == 0
    merged, _ = load_checkpoint(tmp_path / "run" / "merged")  # a plain folder now: vLLM can serve it
    shipped, _ = load_checkpoint(DEMO)
    assert merged.config.expert == shipped.config.expert
    assert merged.config.roi == shipped.config.roi.model_copy(update={"enabled": False})  # the YAML's model.settings
    changed = [
        name
        for name, weight in merged.state_dict().items()
        if name.startswith("model.language_model.") and not torch.equal(weight, shipped.state_dict()[name])
    ]
    assert changed  # the two LoRA steps reached the merged LLM weights
