"""Stage-2 labels: exactly the answer tokens and the ChatML turn end after them; stage-1 batches and masks."""

import numpy as np
import pytest
import torch

from assistant.layout import expand_image_ids
from tests.helpers import defect_image
from training.collate import IGNORE_INDEX, ExpertCollator, InstructCollator


def encode(processor, text):
    return processor.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_no_roi"])
def test_labels_are_the_answers_and_their_end_of_turn_only(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    image = defect_image(56, 56)
    messages = [
        {"role": "user", "content": "<image>\nAre there any defects?"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "top left"},
    ]
    short = [{"role": "user", "content": "<image>\nDefect?"}, {"role": "assistant", "content": "No"}]
    batch = InstructCollator(processor)([(messages, [image]), (short, [image])])

    # The expected sequence, built by hand from pieces that all end next to a special token.
    image_ids = expand_image_ids(processor.layout((56, 56), is_query=True), processor.config)
    pieces = [
        (encode(processor, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"), False),
        (image_ids, False),
        (encode(processor, "\nAre there any defects?<|im_end|>\n<|im_start|>assistant\n"), False),
        (encode(processor, "Yes<|im_end|>\n"), True),  # the template closes the turn with <|im_end|>\n
        (encode(processor, "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n"), False),
        (encode(processor, "top left<|im_end|>\n"), True),
    ]
    expected_ids = [token for ids, _ in pieces for token in ids]
    expected_labels = [token if answer else IGNORE_INDEX for ids, answer in pieces for token in ids]
    length = len(expected_ids)
    assert batch["input_ids"][0, :length].tolist() == expected_ids
    assert batch["labels"][0, :length].tolist() == expected_labels
    assert (batch["labels"][0, length:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, length:] == 0).all()

    labels = batch["labels"][0]
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answered = labels[labels != IGNORE_INDEX].tolist()
    assert answered.count(end_of_turn) == 2 and answered[-2] == end_of_turn
    image_positions = batch["input_ids"][0] == processor.image_token_id
    assert image_positions.sum() > 0 and (labels[image_positions] == IGNORE_INDEX).all()
    phrase = encode(processor, " suspicious features: ")
    assert all(
        label == IGNORE_INDEX for label in labels[len(pieces[0][0]) : len(pieces[0][0]) + len(image_ids)].tolist()
    )
    assert set(phrase) <= set(image_ids)  # the inserted suspicion phrase is part of the ignored expansion

    decoded = processor.tokenizer.decode(batch["labels"][1][batch["labels"][1] != IGNORE_INDEX])
    assert decoded == "No<|im_end|>\n"


def test_the_model_trains_only_on_labelled_positions(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": "<image>\nDefect?"}, {"role": "assistant", "content": "Yes"}]
    batch = InstructCollator(processor)([(messages, [defect_image(56, 56)])])
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    reference = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, reference)


def test_expert_batches_carry_masks_at_the_heatmap_size(tiny):
    _, processor = tiny
    mask = np.zeros((90, 150), np.uint8)
    mask[10:20, 30:60] = 255
    batch = ExpertCollator(processor)([(defect_image(90, 150), 1, mask), (defect_image(56, 56), 0, None)])
    assert batch["labels"].tolist() == [1.0, 0.0]
    assert batch["masks"][1] is None
    source = tuple(batch["source_sizes"][0].tolist())
    assert tuple(batch["masks"][0].shape) == source
    assert set(batch["masks"][0].unique().tolist()) == {0.0, 1.0}
    grids = [processor.layout(size).grid for size in [(90, 150), (56, 56)]]
    assert batch["pixel_values"].shape[0] == sum(1 + rows * cols for rows, cols in grids)  # AnyRes crops, no references
    assert "roi_pixel_values" not in batch  # stage 1 builds no ROI tokens
