"""Composed checkpoints (how the demo model ships): the base LLM from a package, the rest from the folder."""

import json

import pytest
import torch

from assistant.checkpoint import BASE_LLM_FILE, BaseLLM, CheckpointError, is_composed, load_checkpoint, save_composed
from assistant.factory import create_assistant, tiny_assistant, tiny_text_config, tiny_tokenizer, tiny_vision_config
from assistant.presets import TINY_EXPERT
from tests.helpers import defect_image, model_inputs
from training.config import LoraSettings
from training.lora import apply_lora


def test_composed_round_trip_gives_the_trained_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_ASSISTANT_CACHE", str(tmp_path / "cache"))  # merged weights are cached there
    model, processor = tiny_assistant(seed=3)
    base_llm = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))
    }
    trained = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a non-trivial adapter
        trained.base_model.model.model.multi_modal_projector.linear_2.bias.add_(0.25)  # a trained projector
    inputs = model_inputs(processor, [defect_image()], "Defect?")
    with torch.no_grad():
        expected = trained(**inputs).logits

    base = BaseLLM("some_llm_package", "model.gguf")
    folder = save_composed(trained, processor, base, tmp_path / "demo", dtype=torch.float32)
    assert is_composed(folder) and json.loads((folder / BASE_LLM_FILE).read_text())["package"] == "some_llm_package"
    assert not list(folder.glob("model*.safetensors")) and not (folder / "README.md").exists()
    with pytest.raises(CheckpointError, match="some_llm_package"):
        load_checkpoint(folder)[0]  # the base package is not installed: a clear error

    monkeypatch.setattr(BaseLLM, "state_dict", lambda self: base_llm)
    monkeypatch.setattr(BaseLLM, "gguf_folder", lambda self: tmp_path)
    loaded = load_checkpoint(folder)[0]
    with torch.no_grad():
        logits = loaded(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        untrained = tiny_assistant(seed=3)[0](**inputs).logits
    assert not torch.allclose(logits, untrained, atol=1e-2)  # the adapter and the projector change were applied

    half = load_checkpoint(save_composed(trained, processor, base, tmp_path / "half"))[0]  # the shipped, float16 form
    with torch.no_grad():
        assert (half(**inputs).logits - expected).abs().max() < 0.1


@pytest.mark.parametrize("tied", [False, True])
def test_a_composed_folder_is_merged_once_then_read_from_the_cache(tmp_path, monkeypatch, tied):
    """The second load reads the cached merge (no peft), with the same weights; a changed adapter is merged anew.
    Tied output heads (SmolLM2's) stay tied to the embeddings they are loaded with."""
    import peft

    monkeypatch.setenv("ANOMALY_ASSISTANT_CACHE", str(tmp_path / "cache"))
    text = {**tiny_text_config(), "tie_word_embeddings": tied}
    model, processor = create_assistant(tiny_vision_config(), text, tiny_tokenizer(), seed=5, expert=dict(TINY_EXPERT))
    base_llm = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("model.language_model.", "lm_"))}
    monkeypatch.setattr(BaseLLM, "state_dict", lambda self: base_llm)
    monkeypatch.setattr(BaseLLM, "gguf_folder", lambda self: tmp_path)
    trained = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    folder = save_composed(trained, processor, BaseLLM("some_llm_package", "model.gguf"), tmp_path / "c", torch.float32)
    first = load_checkpoint(folder)[0].state_dict()
    assert len(list((tmp_path / "cache" / "merged").glob("*.safetensors"))) == 1

    def no_merge(*args, **kwargs):
        raise AssertionError("merged again")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", no_merge)
    loaded = load_checkpoint(folder)[0]
    second = loaded.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(loaded.lm_head.weight, loaded.model.language_model.embed_tokens.weight) == tied
    assert loaded.lm_head.weight.abs().sum() > 0
    monkeypatch.undo()
    monkeypatch.setenv("ANOMALY_ASSISTANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(BaseLLM, "state_dict", lambda self: base_llm)
    monkeypatch.setattr(BaseLLM, "gguf_folder", lambda self: tmp_path)
    with torch.no_grad():
        next(p for n, p in trained.named_parameters() if "lora_B" in n).add_(1.0)
    save_composed(trained, processor, BaseLLM("some_llm_package", "model.gguf"), folder, torch.float32)
    third = load_checkpoint(folder)[0].state_dict()
    assert any(not torch.equal(first[k], third[k]) for k in first)
    assert len(list((tmp_path / "cache" / "merged").glob("*.safetensors"))) == 2


def test_incomplete_composed_folder_is_reported(tmp_path, tiny_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_path, folder)
    (folder / BASE_LLM_FILE).write_text(json.dumps({"package": "x", "gguf_file": "y.gguf"}))
    with pytest.raises(CheckpointError, match="incomplete composed checkpoint"):
        load_checkpoint(folder)[0]
    with pytest.raises(CheckpointError, match="config.json missing"):
        load_checkpoint(tmp_path / "nowhere")[0]
