"""The full model: ROI on/off, reference images, adverb choice, save/load, generation, training loss."""

import copy

import pytest
import torch

from assistant import AssistantForConditionalGeneration, AssistantProcessor
from assistant.factory import tiny_assistant
from assistant.heatmap import tile_regions
from assistant.layout import tile_content
from assistant.vision import pool_regions
from tests.helpers import defect_image, model_inputs


@pytest.mark.parametrize("roi", [True, False])
def test_forward_with_and_without_roi(roi, tiny, tiny_no_roi):
    model, processor = tiny if roi else tiny_no_roi
    inputs = model_inputs(processor, [defect_image()])
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    analysis = out.analysis
    assert analysis.scores.shape == (1,)
    assert analysis.heatmaps[0].shape == tuple(inputs["source_sizes"][0].tolist())
    assert len(analysis.roi_boxes[0]) == (model.config.roi.max_boxes if roi else 0)  # the crops encoded


def test_forward_with_a_reference_image(tiny):
    model, processor = tiny
    inputs = model_inputs(processor, [defect_image(defect=False, seed=3), defect_image()])
    with torch.no_grad():
        out = model(**inputs)
    assert out.analysis.scores.shape == (1,)  # only the query is analysed
    assert torch.isfinite(out.logits).all()


def test_a_reference_read_like_a_query_gets_its_own_phrase_and_expert_tokens():
    """`reference.prompt` "expert" (Anomaly-OV's multi-image form): the reference's square crop is followed by its
    own suspicion phrase, global token and crop tokens; they come from the reference alone (vLLM encodes every
    image on its own), and the query's tokens do not change."""
    base_model, base_processor = tiny_assistant(seed=0)
    model, processor = tiny_assistant(seed=0, reference={"prompt": "expert"})
    reference, query = defect_image(defect=False, seed=3), defect_image()
    inputs = model_inputs(processor, [reference, query])
    base_inputs = model_inputs(base_processor, [reference, query])
    size = (reference.height, reference.width)
    layout, base_layout = processor.layout(size, False), base_processor.layout(size, False)
    pooled = model.config.expert.pooled_side
    assert (layout.num_adverb, layout.num_expert) == (len(model.config.adverb_token_ids[0]), 1 + pooled * pooled)
    assert layout.num_embeddings == base_layout.num_embeddings + layout.num_adverb + layout.num_expert
    phrase = len(model.config.phrase_prefix_ids) + len(model.config.phrase_suffix_ids)
    assert (
        inputs["input_ids"].shape[1]
        == base_inputs["input_ids"].shape[1] + layout.num_adverb + layout.num_expert + phrase
    )
    with torch.no_grad():
        encoding = model.encode_images(**image_inputs(inputs))
        base_encoding = base_model.encode_images(**image_inputs(base_inputs))
        alone = model.encode_images(  # the reference's crop alone, as vLLM's encoder may see it
            **{key: inputs[key][:1] for key in ("pixel_values", "image_sizes", "image_is_query")},
            source_sizes=inputs["source_sizes"][:0],
        )
    assert encoding.embeddings.shape[0] == sum(layout.num_embeddings for layout in encoding.layouts)
    first = encoding.embeddings[: layout.num_embeddings]
    torch.testing.assert_close(first, alone.embeddings)
    torch.testing.assert_close(
        first[: base_layout.num_embeddings], base_encoding.embeddings[: base_layout.num_embeddings]
    )
    torch.testing.assert_close(
        encoding.embeddings[layout.num_embeddings :], base_encoding.embeddings[base_layout.num_embeddings :]
    )
    assert not torch.allclose(first[base_layout.num_embeddings :], first[base_layout.num_embeddings :].mean(0))


def image_inputs(inputs) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


def roi_embeddings(encoding) -> torch.Tensor:
    layout = encoding.layouts[-1]
    return encoding.embeddings[encoding.embeddings.shape[0] - layout.num_roi :]


def test_reencoded_roi_tokens_come_from_the_chosen_regions():
    """With crops re-encoded, changing the ROI source pixels changes the ROI embeddings and nothing else."""
    model, processor = tiny_assistant(roi={"tokens_from": "crops"})
    inputs = image_inputs(model_inputs(processor, [defect_image()]))
    with torch.no_grad():
        first = model.encode_images(**inputs)
        second = model.encode_images(**{**inputs, "roi_pixel_values": 255 - inputs["roi_pixel_values"]})
    layout = first.layouts[0]
    roi_start = layout.num_embeddings - layout.num_roi
    torch.testing.assert_close(first.embeddings[:roi_start], second.embeddings[:roi_start])
    assert not torch.allclose(first.embeddings[roi_start:], second.embeddings[roi_start:])


def test_roi_tokens_from_tiles_pool_the_boxes_on_the_tile_features():
    """Without a second pass a box's tokens are its region of the projected tile map, RoIAlign-pooled: they follow
    the box, not the ROI source pixels."""
    model, processor = tiny_assistant(roi={"tokens_from": "tiles"})
    inputs = image_inputs(model_inputs(processor, [defect_image()]))
    core, config = model.model, model.config
    with torch.no_grad():
        encoding = model.encode_images(**inputs)
        other = model.encode_images(**{**inputs, "roi_pixel_values": 255 - inputs["roi_pixel_values"]})
        features, _ = core.vision_features(inputs["pixel_values"])
        projected = core.multi_modal_projector(features)
    torch.testing.assert_close(roi_embeddings(encoding), roi_embeddings(other))
    side, (rows, cols) = config.patches_per_side, encoding.layouts[0].grid
    hidden = projected.shape[-1]
    tiles = projected[1:].view(rows, cols, side, side, hidden).permute(4, 0, 2, 1, 3).reshape(hidden, rows * side, -1)
    boxes = torch.tensor([box.corners for box in encoding.analysis.roi_boxes[0]], dtype=torch.float32)
    regions = tile_regions(
        boxes, tuple(inputs["image_sizes"][0].tolist()), (rows, cols), side, tuple(inputs["source_sizes"][0].tolist())
    )
    expected = pool_regions(tiles, regions, side // config.roi.pool).reshape(-1, hidden)
    torch.testing.assert_close(roi_embeddings(encoding), expected)
    assert len({tuple(box.corners) for box in encoding.analysis.roi_boxes[0]}) > 1  # distinct regions, distinct tokens
    per_box = roi_embeddings(encoding).view(len(boxes), -1, hidden)
    assert not torch.allclose(per_box[0], per_box[1])


@pytest.mark.parametrize("source_max_side, reencoded", [(896, True), (224, False)])
def test_auto_reencodes_only_where_the_source_is_finer_than_the_tiles(source_max_side, reencoded):
    """An 896 px photo with one small suspicious spot: its tiles are at most 336 px here, so a 56 px box of an 896 px
    ROI source covers 1.5 tile patches and "auto" re-encodes it (4 patches); from a 224 px source the same box
    covers 6 patches of the tiles, finer than its crop, and their features are pooled instead."""
    image, spot = defect_image(896, 896), torch.zeros(896, 896)
    spot[400:410, 600:610] = 1.0
    text = "Are there any defects?"
    embeddings = {}
    for mode in ("auto", "crops", "tiles"):
        roi = {"tokens_from": mode, "source_max_side": source_max_side, "map_source": "external", "max_boxes": 1}
        model, processor = tiny_assistant(roi=roi)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        inputs = image_inputs(processor(text=prompt, images=[image], roi_maps=[spot.numpy()]))
        with torch.no_grad():
            embeddings[mode] = roi_embeddings(model.encode_images(**inputs))
    assert not torch.allclose(embeddings["crops"], embeddings["tiles"])
    torch.testing.assert_close(embeddings["auto"], embeddings["crops" if reencoded else "tiles"])


def test_pool_regions_averages_each_bin_of_a_region():
    """On a map linear in x and y, bilinear samples are exact, so each bin's mean is its centre's value."""
    height, width = 6, 8
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    feature_map = torch.stack([xs, ys]).float()  # channel 0 = x, channel 1 = y of each cell centre
    regions = torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 0.0, 8.0, 6.0]])
    pooled = pool_regions(feature_map, regions, 2)  # [2, 2, 2, 2]
    torch.testing.assert_close(pooled[0, :, :, 0], torch.tensor([[2.0, 4.0], [2.0, 4.0]]))
    torch.testing.assert_close(pooled[0, :, :, 1], torch.tensor([[2.0, 2.0], [4.0, 4.0]]))
    torch.testing.assert_close(pooled[1, 0, :, 0], torch.tensor([3.5, 6.5]), atol=0.2, rtol=0)  # clamped at the edge


def test_tile_regions_place_boxes_where_the_heatmap_puts_the_tiles():
    """The whole source maps onto the tiles' unpadded content, as `assemble_heatmap` reads it back."""
    side, grid, image_size, source = 4, (2, 3), (120, 160), (240, 320)
    whole = tile_regions(torch.tensor([[0.0, 0.0, 320.0, 240.0]]), image_size, grid, side, source)
    rows, cols = tile_content((grid[0] * side, grid[1] * side), image_size, keep_one=True)
    torch.testing.assert_close(
        whole[0], torch.tensor([cols.start, rows.start, cols.stop, rows.stop], dtype=torch.float32)
    )
    half = tile_regions(torch.tensor([[0.0, 0.0, 160.0, 120.0]]), image_size, grid, side, source)
    torch.testing.assert_close(half[0, 2:] - half[0, :2], (whole[0, 2:] - whole[0, :2]) / 2)


def test_external_roi_map_decides_the_boxes():
    model, processor = tiny_assistant(roi={"map_source": "external"})
    image = defect_image(200, 200)
    anomaly_map = torch.zeros(200, 200)
    anomaly_map[150:160, 20:30] = 1.0
    content = [{"type": "image"}, {"type": "text", "text": "defect?"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=text, images=[image], roi_maps=[anomaly_map.numpy()])
    with torch.no_grad():
        analysis = model(**inputs).analysis
    x0, y0, x1, y1 = analysis.boxes[0][0].corners
    assert x0 <= 20 and x1 >= 30 and y0 <= 150 and y1 >= 160
    with pytest.raises(ValueError, match="roi_maps"):
        model(**processor(text=text, images=[image]))


@pytest.mark.parametrize("bias, adverb", [(-20.0, 0), (0.0, 1), (20.0, 2)])
def test_score_picks_the_suspicion_adverb(tiny, bias, adverb):
    model, processor = tiny
    model = copy.deepcopy(model)
    head = model.anomaly_expert.selector.score_head[2]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, bias)  # score = sigmoid(bias): ~0, 0.5, ~1
    inputs = model_inputs(processor, [defect_image()])
    with torch.no_grad():
        encoding = model.encode_images(**{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
    layout = encoding.layouts[0]
    written = encoding.embeddings[layout.num_base : layout.num_base + layout.num_adverb]
    expected = model.get_input_embeddings()(torch.tensor(model.config.adverb_token_ids[adverb]))
    torch.testing.assert_close(written, expected)


def test_save_and_load_give_identical_logits(tiny, tiny_path):
    model, processor = tiny
    loaded = AssistantForConditionalGeneration.from_pretrained(tiny_path).eval()
    loaded_processor = AssistantProcessor.from_pretrained(tiny_path)
    image = defect_image(90, 150)
    a, b = model_inputs(processor, [image]), model_inputs(loaded_processor, [image])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    with torch.no_grad():
        # Bit-identical weights; the logits may differ in the last float32 bit (the loaded tensors' memory
        # layout can pick other CPU kernels), far below any difference a lost or wrong weight makes.
        torch.testing.assert_close(model(**a).logits, loaded(**b).logits, rtol=0, atol=1e-6)
    assert (tiny_path / "model.safetensors").exists()
    assert not list(tiny_path.glob("*.bin"))


def test_generation_runs_end_to_end(tiny):
    model, processor = tiny
    inputs = model_inputs(processor, [defect_image()])
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 6 or processor.tokenizer.eos_token_id in tokens[0]


def test_loss_only_on_labelled_tokens_and_gradients_reach_the_expert(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    inputs = model_inputs(processor, [defect_image()])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -3:] = inputs["input_ids"][0, -3:]
    out = model(**inputs, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    assert model.anomaly_expert.selector.query_proj.weight.grad.abs().sum() > 0
    # Same loss as the full-vocabulary cross-entropy over every position.
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        torch.testing.assert_close(model(**inputs, labels=labels).loss, reference)


def test_mismatched_placeholders_give_a_clear_error(tiny):
    model, processor = tiny
    inputs = model_inputs(processor, [defect_image()])
    keep = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    keep[0, inputs["input_ids"][0].tolist().index(processor.image_token_id)] = False
    inputs["input_ids"] = inputs["input_ids"][keep][None]
    inputs["attention_mask"] = inputs["attention_mask"][keep][None]
    with pytest.raises(ValueError, match="image-token positions"):
        model(**inputs)


def test_llama_text_model_also_works():
    model, processor = tiny_assistant(text_model="llama")
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs(processor, [defect_image()])).logits).all()
