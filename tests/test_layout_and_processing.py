"""Placeholder counts from the processor must equal the embeddings the model produces, for any image."""

import pytest
import torch

from assistant.layout import anyres_grid, expand_image_ids, image_layout
from tests.helpers import defect_image

SIZES = [(56, 56), (120, 160), (160, 120), (30, 300), (300, 30), (336, 336), (500, 90), (13, 17)]


def chat(processor, n_images, question="Any defect?"):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("roi", [True, False])
def test_processor_and_model_agree(size, roi, tiny, tiny_no_roi):
    model, processor = tiny if roi else tiny_no_roi
    image = defect_image(*size)
    inputs = processor(text=chat(processor, 1), images=[image])
    layout = processor.layout(size)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == layout.num_embeddings
    with torch.no_grad():
        encoding = model.encode_images(
            **{k: inputs[k] for k in ("pixel_values", "image_sizes", "image_is_query", "source_sizes")},
            roi_pixel_values=inputs.get("roi_pixel_values"),
        )
    assert encoding.embeddings.shape[0] == layout.num_embeddings
    # 4x4 patches pooled by 2 per box; 4 boxes, or one where the image fits in one 56 px crop (every box would be
    # the whole image again)
    boxes = (1 if max(size) <= 56 else 4) if roi else 0
    assert (layout.num_boxes, layout.num_roi) == (boxes, boxes * 4)
    if roi:
        assert len(encoding.analysis.roi_boxes[0]) == boxes


def test_large_grids_are_downsampled_like_llava_onevision(tiny):
    model, _ = tiny
    layout = image_layout((336, 336), model.config)
    assert anyres_grid((336, 336), model.config) == (6, 6)
    # 24x24 tile patches exceed anyres_max_9 (9 tiles of 4x4) by a ratio of 2 -> 12x12 + 12 newlines.
    assert layout.num_base == 16 + 12 * 12 + 12


def test_reference_images_use_the_base_crop_only(tiny):
    model, processor = tiny
    text = chat(processor, 2)
    inputs = processor(text=text, images=[defect_image(80, 200, defect=False), defect_image()])
    assert inputs["image_is_query"].tolist() == [False, True]
    reference = processor.layout((80, 200), is_query=False)
    query = processor.layout((120, 160))
    assert reference.num_embeddings == 16 + 1
    assert (
        int((inputs["input_ids"] == processor.image_token_id).sum())
        == reference.num_embeddings + query.num_embeddings
    )
    assert inputs["pixel_values"].shape[0] == 1 + 1 + query.grid[0] * query.grid[1]


def test_suspicion_phrase_sits_between_base_and_expert_tokens(tiny):
    model, processor = tiny
    config = model.config
    ids = processor(text=chat(processor, 1), images=[defect_image()])["input_ids"][0].tolist()
    layout = processor.layout((120, 160))
    start = ids.index(config.image_token_id)
    after_base = start + layout.num_base
    prefix = config.phrase_prefix_ids
    assert ids[after_base : after_base + len(prefix)] == prefix
    suffix_start = after_base + len(prefix) + layout.num_adverb
    assert ids[suffix_start : suffix_start + len(config.phrase_suffix_ids)] == config.phrase_suffix_ids
    decoded = processor.tokenizer.decode(prefix + config.adverb_token_ids[2] + config.phrase_suffix_ids)
    assert decoded == "with highly suspicious features: "


def test_batch_padding_and_mismatched_images_are_rejected(tiny):
    _, processor = tiny
    texts = [chat(processor, 1), chat(processor, 1, "A much longer question about the object?")]
    batch = processor(text=texts, images=[defect_image(60, 60), defect_image(200, 100)], padding_side="left")
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][:, -1].all()
    with pytest.raises(ValueError, match="placeholders"):
        processor(text=chat(processor, 1), images=[defect_image(), defect_image()])


def test_one_expansion_for_ids_and_labels(tiny):
    """`expand_images` serves the processor (ids) and the collator (ids + labels): image positions are no targets."""
    model, processor = tiny
    image = processor.image_token_id
    reference = expand_image_ids(processor.layout((80, 200), is_query=False), model.config)
    query = expand_image_ids(processor.layout((120, 160)), model.config)
    ids, labels = processor.expand_images([7, image, 8, image, 9], [(80, 200), (120, 160)], [-100, 5, 8, 6, 9])
    assert ids == [7, *reference, 8, *query, 9]
    assert labels == [-100] * (1 + len(reference)) + [8] + [-100] * len(query) + [9]
    assert processor.expand_images([7, 8], [])[1] == [-100, -100]  # no labels given: nothing is a target
    with pytest.raises(ValueError, match="2 image tokens for 1 images"):
        processor.expand_images([image, image], [(56, 56)])


def test_external_roi_maps_are_resized_to_the_source(tiny):
    _, processor = tiny
    inputs = processor(text=chat(processor, 1), images=[defect_image(120, 160)], roi_maps=[torch.rand(10, 10).numpy()])
    height, width = inputs["source_sizes"][0].tolist()
    assert inputs["roi_maps"].shape == (1, 224, 224)
    assert inputs["roi_maps"][0, height:, :].abs().sum() == 0
    assert inputs["roi_maps"][0, :height, :width].abs().sum() > 0
