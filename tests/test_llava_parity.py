"""Parity with stock LLaVA-OneVision: a converted llava-hf checkpoint reads images as transformers'
`LlavaOnevisionForConditionalGeneration` does.

A tiny random stock model (SigLIP + Qwen2, head dim 32) is saved with its stock `LlavaOnevisionProcessor` and
converted with `from_llava_onevision`. The AnyRes grid is llava-hf's 1x1..6x6 tiles (of 56 px crops here), so
images reach 24x24 patches and `anyres_max_9` downsamples them as it does for the published checkpoints.
Compared: the pixel crops, the base image tokens (what stock scatters into its `<image>` positions; ours are the
first `layout.num_base` embeddings of a query, before the expert's and the ROI tokens), the input_ids and, with
the expert's and ROI tokens off, the logits; and how `vision_feature_layer` / `vision_feature_select_strategy`
are honoured.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

from assistant.config import ExpertConfig, Settings
from assistant.convert import from_llava_onevision
from assistant.errors import AssistantError
from assistant.factory import (
    create_config,
    grid_pinpoints,
    prepare_tokenizer,
    tiny_assistant,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)
from assistant.vision import VisionFeatureError, select_vision_features, spread_feature_layers
from tests.helpers import tiny_llava_config

CROP = 56  # tiny_vision_config: 56 px crops of 4x4 patches, 4 layers, width 64
PINPOINTS = grid_pinpoints(CROP)  # 1x1 ... 6x6 tiles, as llava-hf's 384 px grid
EXPERT = {  # the tiny tower's 4 layers and small expert sizes (as tiny_assistant)
    "feature_layers": [1, 2, 3, 4],
    "embedding_dim": 32,
    "class_dim": 32,
    "attention_dim": 32,
    "predictor_dim": 32,
}
ROI = {"source_max_side": 224}
BASE_ONLY = Settings(expert={"tokens": False}, roi={"enabled": False})
ALL_PARTS = Settings(expert={"tokens": True}, roi={"enabled": True})

# (width, height) -> stock's token count: 16 base-crop tokens + the unpadded tile grid + one newline per row.
# A tile is 4x4 patches here, and unpadding drops only whole pairs of padded patch rows (columns).
SIZES = {
    (56, 56): 36,  # 1x1 tile: 4x4 + 4 newlines
    (40, 120): 76,  # tall, 3x1 tiles (12x4 patches), which it fills
    (120, 40): 68,  # wide, 1x3 tiles (4x12 patches)
    (200, 90): 152,  # 2x4 tiles (8x16 patches), under two patch rows of padding: nothing unpadded
    (150, 60): 68,  # 2x3 tiles: 8 patch rows unpadded to 4
    (60, 150): 76,  # 3x2 tiles: 8 patch columns unpadded to 4
    (170, 100): 136,  # 2x4 tiles: a wide image padded at its sides, 16 columns unpadded to 14
    (100, 170): 142,  # 4x2 tiles: 16 rows unpadded to 14
    (300, 300): 172,  # 6x6 tiles = 24x24 patches, which anyres_max_9 downsamples to 12x12 (+ 12 newlines)
    (300, 200): 151,  # 4x6 tiles = 16x24 patches, downsampled to 9x14
    (400, 50): 116,  # a 1:8 strip: 1x6 tiles (4x24 patches)
    (50, 400): 136,  # an 8:1 strip: 6x1 tiles (24x4 patches)
    (500, 90): 116,  # 2x6 tiles: 8 rows unpadded to 4
    (1000, 30): 16,  # a 1:33 strip, thinner than a patch row of its 1x6 grid: stock keeps no tile tokens
}


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save_stock(path, **config_kwargs):
    """A tiny random llava-hf folder (weights, tokenizer, stock processor) and the stock model, in eval mode."""
    tokenizer = prepare_tokenizer(tiny_tokenizer())
    config = tiny_llava_config(tokenizer, image_grid_pinpoints=PINPOINTS, **config_kwargs)
    torch.manual_seed(1)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    normalise = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # SigLIP's, as llava-hf saves
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS, **normalise
        ),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": CROP, "width": CROP}, **normalise),
        tokenizer=tokenizer,
        num_image_tokens=(CROP // 14) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=tokenizer.chat_template,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model


def stock_processor(path) -> LlavaOnevisionProcessor:
    """The folder's stock processor with the PIL image backend (transformers' default here is torchvision's,
    which rounds resized pixels differently: see `test_stock_torchvision_backend_rounds_differently`)."""
    processor = LlavaOnevisionProcessor.from_pretrained(path)
    processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    return processor


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """(folder, stock model, stock processor) with llava-hf's settings: layer -1, strategy "full"."""
    path, model = save_stock(tmp_path_factory.mktemp("llava") / "llava-tiny")
    return path, model, stock_processor(path)


@pytest.fixture(scope="module")
def converted(stock):
    """(model, processor) converted from `stock`, reading every token part (base, expert, ROI)."""
    model, processor = from_llava_onevision(stock[0], expert=EXPERT, roi=ROI)
    model.config.apply_settings(ALL_PARTS)
    assert processor.config is model.config
    return model.eval(), processor


def stock_image_tokens(model, inputs) -> torch.Tensor:
    """What stock's forward scatters into the `<image>` positions, all images in order."""
    with torch.no_grad():
        return model.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
        ).image_hidden_states


def our_base_tokens(model, inputs) -> list[torch.Tensor]:
    """The base tokens of every query image: the first `num_base` of its embeddings."""
    keys = ("pixel_values", "image_sizes", "image_is_query", "source_sizes", "roi_pixel_values")
    with torch.no_grad():
        encoding = model.model.encode_images(**{key: inputs[key] for key in keys if key in inputs})
    tokens, start = [], 0
    for layout in encoding.layouts:
        tokens.append(encoding.embeddings[start : start + layout.num_base])
        start += layout.num_embeddings
    assert start == encoding.embeddings.shape[0]
    return tokens


def assert_same_crops(stock_inputs, our_inputs, counts):
    """Stock pads every sample's crops to the batch's largest count; ours concatenates them."""
    ours = torch.split(our_inputs["pixel_values"], counts)
    for stock_crops, our_crops, count in zip(stock_inputs["pixel_values"], ours, counts):
        assert torch.equal(stock_crops[:count], our_crops)
    assert stock_inputs["image_sizes"].tolist() == our_inputs["image_sizes"].tolist()


def assert_base_tokens_match(stock_model, stock_proc, model, processor, images, atol=1e-5):
    stock_inputs = stock_proc(images=images, text=["<image>"] * len(images), padding=True, return_tensors="pt")
    our_inputs = processor(text=["<image>"] * len(images), images=images)
    layouts = [processor.layout((image.height, image.width)) for image in images]
    assert_same_crops(stock_inputs, our_inputs, [layout.num_crops for layout in layouts])
    stock_counts = (stock_inputs["input_ids"] == stock_model.config.image_token_id).sum(1).tolist()
    assert stock_counts == [layout.num_base for layout in layouts]
    expected = torch.split(stock_image_tokens(stock_model, stock_inputs), stock_counts)
    for ours, theirs in zip(our_base_tokens(model, our_inputs), expected):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    return stock_counts


# -- 1. base tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", list(SIZES), ids=[f"{w}x{h}" for w, h in SIZES])
def test_base_tokens_equal_stock(stock, converted, size):
    path, stock_model, stock_proc = stock
    model, processor = converted
    counts = assert_base_tokens_match(stock_model, stock_proc, model, processor, [random_image(*size)])
    assert counts == [SIZES[size]]  # the case is the one named in SIZES (tiles, unpadding, downsampling)


def test_base_tokens_equal_stock_in_a_batch(stock, converted):
    """Two prompts of one image each: stock pads their crops to one count, ours splits them by layout."""
    _, stock_model, stock_proc = stock
    model, processor = converted
    images = [random_image(200, 90), random_image(40, 120, seed=1)]
    assert assert_base_tokens_match(stock_model, stock_proc, model, processor, images) == [152, 76]


def test_base_tokens_do_not_depend_on_the_other_parts(stock, converted):
    """Switching the expert's and ROI tokens off leaves the base tokens as they were."""
    model, processor = converted
    image = random_image(200, 90)
    everything = our_base_tokens(model, processor(text="<image>", images=[image]))[0]
    base_model, base_processor = from_llava_onevision(stock[0], expert=EXPERT, roi=ROI)
    base_model.config.apply_settings(BASE_ONLY)
    alone = our_base_tokens(base_model.eval(), base_processor(text="<image>", images=[image]))[0]
    assert torch.equal(everything, alone)


def test_base_tokens_equal_stock_above_max_image_side_when_it_is_off(stock):
    """Images with a long side over `max_image_side` (1024) are shrunk first (Anomaly-OV's rule), stock keeps
    them; with the rule off (None) a large image's tokens are stock's too."""
    path, stock_model, stock_proc = stock
    model, processor = from_llava_onevision(path, expert=EXPERT, roi=ROI)
    model.config.max_image_side = None
    counts = assert_base_tokens_match(stock_model, stock_proc, model.eval(), processor, [random_image(1200, 160)])
    assert counts == [116]


def test_stock_torchvision_backend_rounds_differently(stock, converted):
    """transformers' default image backend where torchvision is installed (what `from_pretrained` gives) resizes
    with torchvision, ours with PIL (as the vLLM environment, which has no torchvision), which stock's PIL
    backend matches exactly (above). Against the torchvision backend the crops differ by rounding, at most two
    uint8 levels (one level is 2/255 after SigLIP's normalisation): the one preprocessing difference."""
    path = stock[0]
    default = LlavaOnevisionProcessor.from_pretrained(path)
    if type(default.image_processor).__name__ == "LlavaOnevisionImageProcessorPil":
        pytest.skip("no torchvision here: transformers' default image backend is PIL's, compared above")
    _, processor = converted
    image = random_image(200, 90)
    theirs = default(images=image, text="<image>", return_tensors="pt")["pixel_values"][0]
    ours = processor(text="<image>", images=[image])["pixel_values"]
    difference = (theirs - ours).abs().max().item() * 255 / 2  # in uint8 levels
    assert difference <= 2 + 1e-3


# -- 2. logits -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(170, 100), (300, 300)], ids=["170x100", "300x300"])  # unpadded; downsampled
def test_logits_equal_stock_with_expert_and_roi_tokens_off(stock, size):
    path, stock_model, stock_proc = stock
    model, processor = from_llava_onevision(path, expert=EXPERT, roi=ROI)
    model.config.apply_settings(BASE_ONLY)
    model.eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a defect?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = random_image(*size)
    stock_inputs = stock_proc(images=image, text=text, return_tensors="pt")
    our_inputs = processor(text=text, images=[image])
    assert torch.equal(our_inputs["input_ids"], stock_inputs["input_ids"])
    assert torch.equal(our_inputs["attention_mask"], stock_inputs["attention_mask"])
    assert torch.equal(our_inputs["pixel_values"], stock_inputs["pixel_values"][0])
    with torch.no_grad():
        theirs = stock_model(**stock_inputs).logits
        ours = model(**our_inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# -- 3. vision_feature_layer and vision_feature_select_strategy ---------------------------------------------


@pytest.mark.parametrize("layer", [-2, 1])
def test_vision_feature_layer_is_honoured(tmp_path, layer):
    path, stock_model = save_stock(tmp_path / "llava", vision_feature_layer=layer)
    model, processor = from_llava_onevision(path, expert=EXPERT, roi=ROI)
    model.config.apply_settings(ALL_PARTS)
    assert model.config.vision_feature_layer == layer
    images = [random_image(200, 90)]
    assert_base_tokens_match(stock_model, stock_processor(path), model.eval(), processor, images)


@pytest.mark.parametrize(
    "layer, strategy", [(-1, "full"), (-2, "default"), ([-2, -1], "full"), ([1, 3], "default")], ids=str
)
def test_feature_selection_is_stocks_rule(layer, strategy):
    """`select_vision_features` picks what stock's `get_image_features` does, lists and "default" included, on
    the one input stock takes them for: multi-image crops, one per image with no grid to keep (the refusals
    below are about our image side, not the rule)."""
    config = tiny_llava_config(
        prepare_tokenizer(tiny_tokenizer()), vision_feature_layer=layer, vision_feature_select_strategy=strategy
    )
    torch.manual_seed(2)
    stock_model = LlavaOnevisionForConditionalGeneration(config).eval().model
    pixels = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        theirs = stock_model.get_image_features(pixels, torch.tensor([[CROP, CROP]] * 2), batch_num_images=[2])
        hidden = stock_model.vision_tower(pixels, output_hidden_states=True).hidden_states
        ours = stock_model.multi_modal_projector(select_vision_features(hidden, layer, strategy))
    for our_crop, their_image in zip(ours, theirs.pooler_output):
        torch.testing.assert_close(our_crop, their_image[:-1], atol=1e-6, rtol=0)  # stock adds a newline


def test_default_strategy_on_siglip_is_refused_at_load(tmp_path):
    """'default' drops the first token, a CLS token SigLIP does not have: stock breaks the 4x4 patch grid and
    fails on every AnyRes image; ours refuses the checkpoint when it is converted, in one line."""
    path, stock_model = save_stock(tmp_path / "llava", vision_feature_select_strategy="default")
    stock_inputs = stock_processor(path)(images=random_image(200, 90), text="<image>", return_tensors="pt")
    with pytest.raises(ValueError, match="number of patches is not consistent"), torch.no_grad():
        stock_model(**stock_inputs)
    with pytest.raises(VisionFeatureError, match="vision_feature_select_strategy='default'") as refused:
        from_llava_onevision(path, expert=EXPERT, roi=ROI)
    assert isinstance(refused.value, AssistantError)  # the CLI prints it as `error: ...`, exit code 2
    assert "\n" not in str(refused.value) and "'full'" in str(refused.value)


def test_layer_list_widens_the_projector_and_is_refused_at_load(tmp_path):
    """Stock concatenates the layers' features, so its projector reads 2 x 64 features; our config carries the
    list and would build the same projector, but the expert reads one layer's 64 and its tokens go through that
    projector: the conversion refuses it in one line."""
    layers = [-2, -1]
    path, stock_model = save_stock(tmp_path / "llava", vision_feature_layer=layers)
    assert stock_model.model.multi_modal_projector.linear_1.in_features == 2 * 64
    ours = create_config(tiny_vision_config(), tiny_text_config(), tiny_tokenizer(), vision_feature_layer=layers)
    assert LlavaOnevisionMultiModalProjector(ours).linear_1.in_features == 2 * 64
    with pytest.raises(VisionFeatureError, match=r"vision_feature_layer=\[-2, -1\]") as refused:
        from_llava_onevision(path, expert=EXPERT, roi=ROI)
    assert "\n" not in str(refused.value)


def test_out_of_range_vision_feature_layer_is_refused_at_load():
    with pytest.raises(VisionFeatureError, match="out of range for a 4-layer vision tower"):
        tiny_assistant(vision_feature_layer=5)
    with pytest.raises(VisionFeatureError, match="out of range"):
        tiny_assistant(vision_feature_layer=-6)


def test_out_of_range_expert_feature_layers_are_refused_at_load():
    with pytest.raises(VisionFeatureError, match=r"expert feature_layers=\[1, 2, 3, 5\] are out of range"):
        tiny_assistant(expert={"feature_layers": [1, 2, 3, 5]})


def test_conversion_spreads_the_expert_layers_over_the_tower(tmp_path):
    """Anomaly-OV's levels 7/13/19/25 of the 26-layer so400m, the same spacing on another depth: a llava-hf
    tower of any depth converts without the caller naming the expert's layers."""
    assert spread_feature_layers(26) == list(ExpertConfig().feature_layers)
    assert spread_feature_layers(12) == [2, 5, 8, 11]
    path, _ = save_stock(tmp_path / "llava")
    model, _ = from_llava_onevision(path, roi=ROI)
    assert model.config.expert.feature_layers == spread_feature_layers(4) == [0, 1, 2, 3]
