"""The model registry, the token parts an LLM was trained with, and the official long-side rule for every surface."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from assistant import presets
from assistant.checkpoint import UntrainedTokensWarning, checkpoint_config
from assistant.cli import main
from assistant.config import Settings
from assistant.defaults import resolve_model
from assistant.engine import LocalEngine
from assistant.factory import save_assistant, tiny_assistant
from assistant.layout import image_layout
from assistant.serve.images import ItemImageProcessor
from tests.helpers import defect_image


def test_registry_lists_every_preset_with_costs_computed_from_its_shapes():
    assert presets.list_models() == ["tiny", "tiny-no-roi", "demo", "anomaly-ov-0.5b", "anomaly-ov-7b"]
    facts = presets.describe(presets.get_preset("anomaly-ov-0.5b"))
    # LLaVA-OneVision-0.5B on a 1024 px image: 7,371 base tokens (anyres_max_9), as stock transformers counts them.
    assert facts.tokens == {"base": 7371, "expert": 48, "roi": 144}  # expert: adverb + 47 tokens; ROI: 4 x 6 x 6
    assert 0.89e9 < facts.parameters < 0.91e9  # llava-hf's 0.89 B + the expert
    seven = presets.describe(presets.get_preset("anomaly-ov-7b"))
    assert 8.0e9 < seven.parameters < 8.1e9 and seven.memory_gb > seven.weights_gb > 16
    with pytest.raises(Exception, match="unknown model 'nope'.*anomaly-ov-0.5b"):
        presets.get_preset("nope")


def test_the_factory_and_the_demo_recipe_take_their_shapes_from_the_registry():
    from training.demo import DEMO

    model, _ = tiny_assistant()
    vision = model.config.vision_config
    assert vision.hidden_size == presets.TINY_VISION["hidden_size"]
    assert vision.image_size == presets.TINY_VISION["image_size"]
    assert model.config.text_config.hidden_size == presets.TINY_TEXT["hidden_size"]
    assert model.config.expert.embedding_dim == presets.TINY_EXPERT["embedding_dim"]
    assert DEMO.vision is presets.DEMO_VISION


def test_models_command_prints_the_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in presets.list_models():
        assert f"| {name} |" in out
    assert "7,371 / (48 off) / (144 off)" in out  # the stock LLM reads base tokens only


def test_a_random_preset_is_built_once_into_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_ASSISTANT_CACHE", str(tmp_path / "cache"))
    folder = resolve_model("tiny-no-roi")
    assert folder == tmp_path / "cache" / "models" / "tiny-no-roi"
    config = checkpoint_config(folder)
    assert config.llm_token_parts == ["base", "expert"] and not config.roi.enabled and config.expert.tokens
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert main(["pull", "tiny-no-roi"]) == 0 and capsys.readouterr().out.strip() == str(folder)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # not built again
    assert main(["info", "--model", "tiny-no-roi"]) == 0
    assert main(["info", "--model", "no-such-thing"]) == 2
    assert "no such folder, preset" in capsys.readouterr().err


def test_token_parts_the_llm_never_read_warn(tiny_path, tmp_path):
    model, processor = tiny_assistant(roi=False, expert={"tokens": False}, llm_token_parts=["base"])
    folder = save_assistant(model, processor, tmp_path / "base-only")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = checkpoint_config(folder)  # as trained: silent
        checkpoint_config(tiny_path)  # a checkpoint that records nothing: silent
    assert config.token_parts == ["base"]
    with pytest.warns(UntrainedTokensWarning, match="trained with the base image tokens only.*expert/roi"):
        checkpoint_config(folder, Settings(expert={"tokens": True}, roi={"enabled": True}))
    with pytest.raises(ValueError, match="llm_token_parts"):
        tiny_assistant(llm_token_parts=["expert"])


def test_without_expert_tokens_the_llm_reads_base_and_roi_tokens_only(tiny):
    model, processor = tiny_assistant(expert={"tokens": False})
    image = defect_image()
    inputs = processor(text="<image>\nIs there a defect?", images=[image])
    layout = processor.layout((image.height, image.width))
    assert (layout.num_adverb, layout.num_expert) == (0, 0) and layout.num_roi > 0
    with_expert = tiny[1].layout((image.height, image.width))
    assert inputs["input_ids"].shape[1] == tiny[1](text="<image>\nIs there a defect?", images=[image])[
        "input_ids"
    ].shape[1] - with_expert.num_adverb - with_expert.num_expert - len(model.config.phrase_prefix_ids) - len(
        model.config.phrase_suffix_ids
    )
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits.shape[1] == inputs["input_ids"].shape[1]


def test_a_phone_photo_is_shrunk_by_the_official_rule_on_every_surface(tiny):
    """A 4032 x 3024 photo: the vision side sees 1024 x 768 (Anomaly-OV's scripts), the verdict keeps the photo's
    own size, the ROI source reads the original."""
    model, processor = tiny
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (3024, 4032, 3), dtype=np.uint8))
    assert processor.model_size((3024, 4032)) == (768, 1024)
    inputs = processor(text="<image>\nIs there a defect?", images=[photo])
    assert inputs["image_sizes"].tolist() == [[768, 1024]]
    expected = image_layout((768, 1024), model.config)
    assert inputs["pixel_values"].shape[0] == expected.num_crops
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == expected.num_embeddings
    item = ItemImageProcessor(processor)([photo])  # the vLLM plugin's processor
    assert item["image_sizes"].tolist() == [[768, 1024]]
    assert torch.equal(item["pixel_values"][0], inputs["pixel_values"])
    shrunk = photo.resize((1024, 768), Image.Resampling.BICUBIC)
    assert np.array_equal(processor.image_crops(photo, True), processor.image_crops(shrunk, True))
    assert inputs["source_sizes"].tolist() == [[168, 224]]  # roi.source_max_side of the tiny model, from the photo
    verdict = LocalEngine(model, processor).analyze(photo)
    assert verdict.heatmap.shape == (3024, 4032)
