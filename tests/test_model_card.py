"""Every checkpoint says what it is: its model card, shown by `info`, carried by export, read by the app."""

import json

import pytest

from assistant.card import CARD_FILE, CardError, Example, Metric, ModelCard
from assistant.cli import main
from tests.helpers import defect_image


def test_init_tiny_writes_a_card_that_says_it_is_untrained(tmp_path, capsys):
    assert main(["init-tiny", str(tmp_path / "tiny")]) == 0
    card = ModelCard.load(tmp_path / "tiny")
    assert card.name == "tiny random assistant" and "untrained" in card.limits
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "tiny")]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# tiny random assistant") and "not calibrated (raw expert sigmoid)" in shown
    assert "- domain: unknown (no domain statistics in this checkpoint)" in shown


def test_a_card_with_metrics_travels_with_export_and_info_shows_it(tiny_path, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    ModelCard(
        name="parts inspector",
        summary="Finds scratches on metal parts.",
        trained_on="200 photos of plates",
        image_kinds="colour photos of brushed metal",
        classes=["normal", "scratch"],
        metrics=[Metric(name="image AUROC", value=0.9123, split="held-out plates", command="anomaly-assistant eval")],
    ).save(model)
    assert main(["export", str(tmp_path / "exported"), "--model", str(model)]) == 0
    assert ModelCard.load(tmp_path / "exported") == ModelCard.load(model)
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "exported")]) == 0
    shown = capsys.readouterr().out
    assert "- images: colour photos of brushed metal" in shown and "- classes: normal, scratch" in shown
    assert "| image AUROC | 0.912 | held-out plates | `anomaly-assistant eval` |" in shown


def test_a_damaged_card_is_one_line_and_a_missing_one_is_said(tiny_path, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    (model / CARD_FILE).write_text(json.dumps({"name": "x"}))
    assert main(["info", "--model", str(model)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {model / CARD_FILE}: not a valid model card")
    (model / CARD_FILE).unlink()
    assert main(["info", "--model", str(model)]) == 0
    assert "no model card: nothing is known about what it was trained on" in capsys.readouterr().out
    assert main(["info", "--model", str(tmp_path)]) == 2  # not a checkpoint


def test_training_writes_what_the_weights_have_seen(tmp_path):
    from training.config import load_config
    from training.expert import train_expert

    data = tmp_path / "data"
    for index in range(6):
        for folder, defect in (("good", False), ("scratch", True)):
            path = data / "part" / "train" / folder / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            defect_image(seed=index + 10 * defect, defect=defect).save(path)
    config = tmp_path / "expert.yaml"
    config.write_text(
        f"stage: expert\nmodel: {{tiny: true}}\ndata: {{folders: [{{root: {data}, split: train}}]}}\n"
        f"run: {{output_dir: {tmp_path / 'run'}, max_steps: 2, batch_size: 2, checkpoint_every: 100}}\n"
    )
    train_expert(load_config(config, "expert"))
    final = tmp_path / "run" / "final"
    card = ModelCard.load(final)
    assert card.trained_on == f"stage 1 (expert) on {data} [train] (2 steps)"
    assert (final / "domain.safetensors").is_file()  # the training images' domain, fitted at the end


def test_the_app_header_shows_the_card_and_offers_its_examples(tiny_path, tmp_path):
    import shutil

    import gradio as gr

    from assistant.ui import build_demo, load_backend

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    (model / "examples").mkdir()
    defect_image().save(model / "examples" / "scratch.png")
    ModelCard(
        name="plates", summary="Scratches on plates.", examples=[Example(image="examples/scratch.png", label="scratch")]
    ).save(model)
    backend = load_backend(str(model))
    assert [e.image for e in backend.examples] == [(model / "examples" / "scratch.png").resolve()]
    demo = build_demo(backend.engine, card=backend.card, examples=backend.examples)
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and b.elem_id == "model-card"]
    assert texts == [f"**Model:** {backend.card.headline()}"]
    ModelCard(name="plates", summary="x", examples=[Example(image="examples/gone.png", label="normal")]).save(model)
    with pytest.raises(CardError, match="names example 'examples/gone.png', which the folder lacks"):
        load_backend(str(model))
    secret = tmp_path / "secret.png"  # a file beside the checkpoint: a card must not get it served
    defect_image().save(secret)
    for outside in ("../secret.png", str(secret)):
        ModelCard(name="plates", summary="x", examples=[Example(image=outside, label="normal")]).save(model)
        with pytest.raises(CardError, match="which the folder lacks"):
            load_backend(str(model))
