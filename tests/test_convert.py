"""Importing official checkpoints: the Anomaly-OV expert layout and llava-hf LLaVA-OneVision folders."""

import pytest
import torch

from assistant.convert import expert_from_official, expert_to_official, from_llava_onevision, load_official_expert
from tests.helpers import official_expert_state, save_tiny_llava


def test_official_expert_has_32_tensors_and_round_trips(tiny):
    model, _ = tiny
    official = official_expert_state()
    assert len(official) == 32
    ours = expert_from_official(official)
    assert set(ours) == set(model.anomaly_expert.state_dict())
    back = expert_to_official(ours)
    assert set(back) == set(official)
    for key in official:
        assert torch.equal(back[key], official[key]), key
    # The official map keeps softmax channel 1, i.e. its negative embedding is the anomalous one.
    assert torch.equal(ours["ltfm.abnormal_embedding"], official["negative_embedding"][0])


def test_load_official_expert_file_strictly(tiny, tmp_path):
    import copy

    model = copy.deepcopy(tiny[0])
    path = tmp_path / "pretrained_expert_05b.pth"
    torch.save({"module." + k: v for k, v in official_expert_state().items()}, path)
    load_official_expert(model.anomaly_expert, path)
    assert torch.equal(
        model.anomaly_expert.ltfm.token_pooling.weight, official_expert_state()["pooling_layer.0.weight"]
    )

    broken = official_expert_state()
    broken["unknown_layer.weight"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(ValueError, match="unknown_layer"):
        load_official_expert(model.anomaly_expert, path)
    wrong = official_expert_state(dim=16)
    torch.save(wrong, path)
    with pytest.raises(ValueError, match="shape"):
        load_official_expert(model.anomaly_expert, path)
    with pytest.raises(FileNotFoundError):
        load_official_expert(model.anomaly_expert, tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava") / "llava-tiny"
    return path, save_tiny_llava(path)


def test_llava_onevision_weights_are_carried_over(llava_folder, tmp_path):
    path, base = llava_folder
    expert_file = tmp_path / "expert.pth"
    torch.save(official_expert_state(), expert_file)
    model, processor = from_llava_onevision(
        path, expert_file, roi={"source_max_side": 224}, expert={"feature_layers": [1, 2, 3, 4]}
    )
    assert model.config.expert.embedding_dim == 32  # read from the expert file
    ours = model.state_dict()
    for key, tensor in base.state_dict().items():
        assert torch.equal(ours[key], tensor), key
    assert model.config.image_grid_pinpoints == [[56, 56], [56, 112], [112, 56], [112, 112]]
    # Text-only prompts give the same logits as the original model.
    ids = processor.tokenizer("Is there a defect?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
