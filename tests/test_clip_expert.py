"""The training-free CLIP expert (WinCLIP/WinCLIP+) on tiny open_clip models built from JSON configs.

Nothing is downloaded: the towers are random, or hand-set so that brightness is the anomaly, and
open_clip's bundled BPE vocabulary tokenizes the prompts.
"""

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from assistant.cli import main
from assistant.clip.expert import ClipAnomalyExpert
from assistant.clip.loading import ClipSpec, parse_spec
from assistant.clip.prompts import TEMPLATES, class_prompts
from assistant.clip.windows import harmonic_aggregate, window_indices
from assistant.config import Settings
from assistant.engine import Conversation, LocalEngine
from assistant.prompts import INSPECTION_QUESTION
from assistant.verdict import Verdict

# 64 px input, 8 px patches -> an 8x8 patch grid; one layer per tower; vocabulary of the bundled tokenizer.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# The hand-set variant averages patch tokens (no class token to wire) and has a text projection bias.
BRIGHT_CLIP = {
    **TINY_CLIP,
    "vision_cfg": {**TINY_CLIP["vision_cfg"], "pool_type": "avg"},
    "text_cfg": {**TINY_CLIP["text_cfg"], "proj_bias": True},
}
HEIGHT, WIDTH = 96, 128  # not square and not the tower's size: maps must come back at this size
PATCH_H, PATCH_W = 24, 32  # exactly 2x2 CLIP patches once squashed to 64x64

EXTERNAL_MAPS = Settings(roi={"map_source": "external"})  # the ROI tokens take their map from CLIP


def flat_image(patch_at: tuple[int, int] | None = None, seed: int | None = None) -> Image.Image:
    """Dark flat (optionally slightly noisy) image, with a white PATCH_H x PATCH_W patch at (y, x)."""
    pixels = np.full((HEIGHT, WIDTH, 3), 60.0)
    if seed is not None:
        pixels += 6 * np.random.default_rng(seed).standard_normal(pixels.shape)
    if patch_at is not None:
        y, x = patch_at
        pixels[y : y + PATCH_H, x : x + PATCH_W] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def patch_mask(patch_at: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[patch_at[0] : patch_at[0] + PATCH_H, patch_at[1] : patch_at[1] + PATCH_W] = True
    return mask


def write_config(directory, name: str, config: dict) -> str:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _reset(module: torch.nn.Module) -> None:
    """All weights 0, LayerNorm gains 1: every residual block becomes the identity."""
    for parameter in module.parameters():
        parameter.zero_()
    for layer in module.modules():
        if isinstance(layer, torch.nn.LayerNorm):
            layer.weight.fill_(1.0)


@torch.no_grad()
def make_brightness_detector(expert: ClipAnomalyExpert, tilt: float = 0.003) -> None:
    """Hand-set towers for which "anomalous" means "bright".

    Joint space: axis 0 = brightness, axis 1 = "an object". Vision: each patch token is
    [mean red of the patch, 1, 0, ...] (conv + positional embedding), the transformer is the identity,
    and pooling averages the window's tokens; the projection keeps the first two channels, so a
    window's embedding leans towards axis 0 with the share of bright patches in it. Text: only the
    tokens "with" and "damaged" (which occur in the anomalous prompts only) have an embedding; uniform
    causal attention carries them to the end-of-text token, so anomalous prompts map to axis 1 tilted
    by `tilt` towards axis 0 and normal prompts to axis 1 exactly. Cosines then grow with brightness,
    and the small tilt keeps temperature-100 softmax scores graded instead of saturated.
    """
    model, width = expert.model, expert.model.token_embedding.weight.shape[1]
    visual = model.visual
    _reset(visual)
    visual.conv1.weight[0, 0] = 1.0 / (visual.patch_size[0] * visual.patch_size[1])
    visual.positional_embedding[:, 1] = 1.0
    visual.proj[0, 0] = visual.proj[1, 1] = 1.0
    for part in (model.token_embedding, model.transformer, model.ln_final, model.text_projection):
        _reset(part)
    model.positional_embedding.zero_()
    markers = expert.tokenizer.encode("with damaged")
    assert len(markers) == 2 and not set(markers) & set(expert.tokenizer.encode("without flawless perfect unblemished"))
    model.token_embedding.weight[markers, 0] = 1.0
    for block in model.transformer.resblocks:
        block.attn.in_proj_weight[2 * width :] = torch.eye(width)  # values = inputs; queries, keys = 0
        block.attn.out_proj.weight.copy_(torch.eye(width))
    model.text_projection.weight[0, 0] = tilt
    model.text_projection.bias[1] = 1.0


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    return {
        "tiny": write_config(directory, "tiny-clip", TINY_CLIP),
        "bright": write_config(directory, "bright-clip", BRIGHT_CLIP),
    }


@pytest.fixture(scope="module")
def bright_spec(configs, tmp_path_factory):
    """`CONFIG.json@WEIGHTS.safetensors` of the hand-set brightness detector."""
    expert = ClipAnomalyExpert.from_spec(configs["bright"], device="cpu")
    make_brightness_detector(expert)
    weights = tmp_path_factory.mktemp("weights") / "bright.safetensors"
    save_file({k: v.contiguous() for k, v in expert.model.state_dict().items()}, str(weights))
    return f"{configs['bright']}@{weights}"


@pytest.fixture(scope="module")
def bright_expert(bright_spec):
    return ClipAnomalyExpert.from_spec(bright_spec, device="cpu")


@pytest.fixture(scope="module")
def random_expert(configs):
    torch.manual_seed(0)
    return ClipAnomalyExpert.from_spec(configs["tiny"], device="cpu", object_name="metal_nut")


# -- pieces ---------------------------------------------------------------------------------------------------
def test_prompt_ensemble_composes_states_templates_and_object():
    normal, anomalous = class_prompts("metal_nut")
    assert len(normal) == 7 * len(TEMPLATES) and len(anomalous) == 4 * len(TEMPLATES)
    assert "a photo of the flawless metal nut." in normal
    assert "a cropped photo of the metal nut with defect." in anomalous
    assert not any("with " in prompt for prompt in normal)


def test_windows_cover_the_grid_and_aggregate_harmonically():
    indices = window_indices((3, 4), 2)
    assert indices.shape == (6, 4) and indices[0].tolist() == [0, 1, 4, 5] and indices[-1].tolist() == [6, 7, 10, 11]
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 1.0])  # only the last window (patches 6, 7, 10, 11) is sure
    patches = harmonic_aggregate(scores, indices, 12)
    assert patches[11] == pytest.approx(1.0)  # covered by the last window alone
    assert patches[6] == pytest.approx(4 / (2 + 2 + 2 + 1))  # four windows: 0.5, 0.5, 0.5, 1
    assert patches[0] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        window_indices((3, 4), 4)


def test_specs_resolve_names_tags_configs_and_checkpoints(configs, bright_spec, tmp_path):
    assert parse_spec("ViT-B-16-plus-240:laion400m_e32") == ClipSpec("ViT-B-16-plus-240", "laion400m_e32")
    assert parse_spec("ViT-B-32") == ClipSpec("ViT-B-32", None)
    assert parse_spec(configs["tiny"]) == ClipSpec("tiny-clip", None) and "tiny-clip" in open_clip.list_models()
    assert parse_spec(bright_spec).pretrained == bright_spec.split("@")[1]
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        parse_spec("ViT-Nope")
    with pytest.raises(ValueError, match="no pretrained tag"):
        parse_spec("ViT-B-32:not-a-tag")
    with pytest.raises(FileNotFoundError):
        parse_spec(f"{configs['tiny']}@{tmp_path / 'missing.safetensors'}")
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 16}))
    with pytest.raises(ValueError, match="not an open_clip model config"):
        parse_spec(str(tmp_path / "bad.json"))


def test_checkpoint_file_and_folder_specs_load_the_saved_weights(bright_spec, tmp_path):
    config, weights = bright_spec.split("@")
    folder = tmp_path / "bright-folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": BRIGHT_CLIP, "preprocess_cfg": {}}))
    shutil.copy(weights, folder / "open_clip_model.safetensors")
    for spec in (bright_spec, str(folder)):
        proj = ClipAnomalyExpert.from_spec(spec, device="cpu").model.visual.proj
        assert proj[0, 0] == proj[1, 1] == 1.0 and proj[2:].abs().sum() == 0  # hand-set, not random


# -- scores ---------------------------------------------------------------------------------------------------
def test_scores_and_maps_have_image_size_ranges_and_are_deterministic(random_expert):
    image, references = flat_image((36, 48), seed=1), [flat_image(seed=2)]
    for refs in ([], references):
        score, anomaly_map = random_expert.score(image, refs)
        assert 0.0 <= score <= 1.0 and isinstance(score, float)
        assert anomaly_map.shape == (HEIGHT, WIDTH) and anomaly_map.dtype == np.float32
        assert 0.0 <= anomaly_map.min() <= anomaly_map.max() <= 1.0
        again_score, again_map = random_expert.score(image, refs)
        assert again_score == score and np.array_equal(again_map, anomaly_map)
    assert random_expert.score_grid(image)[1].shape == random_expert.grid_size == (8, 8)


@pytest.mark.parametrize("patch_at", [(36, 48), (12, 80)])
def test_bright_patch_scores_highest_with_hand_set_towers(bright_expert, patch_at):
    flat_score, flat_map = bright_expert.score(flat_image())
    score, anomaly_map = bright_expert.score(flat_image(patch_at))
    assert flat_map.max() - flat_map.min() < 1e-5  # nothing stands out on a flat image
    inside = patch_mask(patch_at)
    assert inside[np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)]
    assert anomaly_map[inside].mean() > anomaly_map[~inside].mean() + 0.03
    assert score > flat_score


@pytest.mark.parametrize("patch_at", [(36, 48), (60, 8)])
def test_few_shot_flags_a_patch_absent_from_the_references(configs, patch_at):
    torch.manual_seed(1)
    expert = ClipAnomalyExpert.from_spec(configs["tiny"], device="cpu")
    with torch.no_grad():
        expert.model.text_projection.zero_()  # text says nothing: the zero-shot part is blind
    references = [flat_image(seed=s) for s in (1, 2, 3)]
    query = flat_image(patch_at, seed=4)
    zero_shot_score, zero_shot_map = expert.score(query)
    assert zero_shot_score == pytest.approx(0.5) and zero_shot_map.max() - zero_shot_map.min() < 1e-5
    score, anomaly_map = expert.score(query, references)
    inside = patch_mask(patch_at)
    assert inside[np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)]
    assert score > expert.score(flat_image(seed=5), references)[0]


# -- CLI and ROI path -----------------------------------------------------------------------------------------
@pytest.fixture
def bright_file(tmp_path):
    path = tmp_path / "bright.png"
    flat_image((36, 48)).save(path)
    return str(path)


def test_cli_inspect_with_the_clip_expert_prints_a_verdict(bright_spec, bright_file, capsys):
    argv = ["inspect", bright_file, "--expert", "clip", "--clip-model", bright_spec, "--json"]
    assert main([*argv, "--threshold", "0"]) == 0
    verdict = Verdict.model_validate(json.loads(capsys.readouterr().out))
    assert verdict.anomalous and verdict.reasoning == "" and verdict.defect is None
    assert verdict.heatmap.shape == (HEIGHT, WIDTH)
    top = verdict.boxes[0]
    assert top.x0 <= 48 + PATCH_W // 2 < top.x1 and top.y0 <= 36 + PATCH_H // 2 < top.y1
    assert main([*argv, "--threshold", "1"]) == 0
    verdict = Verdict.model_validate(json.loads(capsys.readouterr().out))
    assert not verdict.anomalous and verdict.boxes == []


def test_cli_clip_expert_takes_its_reasoning_from_the_model(bright_spec, bright_file, tiny_path, capsys):
    argv = ["inspect", bright_file, "--expert", "clip", "--clip-model", bright_spec, "--model", str(tiny_path)]
    assert main([*argv, "--json", "--max-new-tokens", "4", "--threshold", "1"]) == 0
    verdict = Verdict.model_validate(json.loads(capsys.readouterr().out))
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu")
    # the CLIP expert decides (--threshold 1: normal); the model's text continues that decision
    expected = engine.complete([Conversation.start(bright_file, INSPECTION_QUESTION).opening("No,")], 4)[0].strip()
    assert expected.startswith("No,") and verdict.reasoning == expected


def test_cli_reports_clip_usage_errors(configs, bright_file, tiny_path, capsys):
    assert main(["inspect", bright_file, "--expert", "clip"]) == 2
    assert "--clip-model" in capsys.readouterr().err
    assert main(["inspect", bright_file, "--model", str(tiny_path), "--roi-source", "clip"]) == 2
    assert "--clip-model" in capsys.readouterr().err
    assert main(["inspect", bright_file, "--expert", "clip", "--clip-model", "ViT-Nope"]) == 2
    assert "unknown open_clip architecture" in capsys.readouterr().err


def test_external_roi_maps_need_an_expert(tiny_path):
    with pytest.raises(ValueError, match="external expert"):
        LocalEngine.from_pretrained(tiny_path, device="cpu", settings=EXTERNAL_MAPS)


def test_roi_boxes_follow_the_clip_map(tiny_path, bright_expert, monkeypatch):
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu", settings=EXTERNAL_MAPS, roi_expert=bright_expert)
    maps, preprocess = [], engine.processor.preprocess_images

    def spy(groups, roi_maps=None):
        maps.append(roi_maps)
        return preprocess(groups, roi_maps)

    monkeypatch.setattr(engine.processor, "preprocess_images", spy)
    reference, query = flat_image(seed=1), flat_image((60, 88))
    engine.analyze(query, [reference])  # the references are the CLIP expert's few-shot normals too
    assert len(maps[0]) == 1 and np.array_equal(maps[0][0], bright_expert.score(query, [reference])[1])
    crop = engine.model.config.crop_size
    for patch_at in [(0, 0), (60, 88), (0, 96), (72, 0)]:
        analysis = engine.encode([flat_image(patch_at)]).analysis
        centre_y, centre_x = patch_at[0] + PATCH_H // 2, patch_at[1] + PATCH_W // 2
        x0, y0, x1, y1 = analysis.boxes[0][0].corners  # the top box on the CLIP map (source = image size here)
        assert x0 <= centre_x < x1 and y0 <= centre_y < y1
        assert x1 - x0 == y1 - y0 == crop  # one compact region, grown to one crop: not a merge of scattered peaks
        assert analysis.roi_boxes[0][0] == analysis.boxes[0][0]  # and it is the first ROI crop encoded


def test_cli_inspect_with_clip_roi_maps(bright_spec, bright_file, tiny_path, capsys):
    argv = ["inspect", bright_file, "--model", str(tiny_path), "--roi-source", "clip", "--clip-model", bright_spec]
    assert main([*argv, "--json", "--max-new-tokens", "2"]) == 0
    assert Verdict.model_validate(json.loads(capsys.readouterr().out)).heatmap.shape == (HEIGHT, WIDTH)
