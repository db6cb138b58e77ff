"""Stage 1: the expert's own forward, loss going down, only the expert training, exact resume, the CLI."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from assistant import AssistantForConditionalGeneration
from assistant.cli import main
from assistant.factory import tiny_assistant
from assistant.heatmap import assemble_heatmap, crop_targets
from data.errors import DataError
from data.synth_dataset import SynthSpec, write_synthetic_dataset
from tests.helpers import defect_image
from training.checkpoint import checkpoint_dir, latest_checkpoint
from training.collate import ExpertCollator
from training.config import load_config
from training.expert import ExpertObjective, train_expert
from training.loop import truncate_metrics
from training.losses import class_weights, mask_counts, patch_mask_loss

TINY_CONFIG = Path(__file__).parents[1] / "training" / "configs" / "tiny_expert.yaml"


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(
        root, SynthSpec(categories=["textile"], train_good=6, test_good=2, test_defective=1, size=56)
    )
    return root


def config(dataset_root, output, *overrides):
    return load_config(
        TINY_CONFIG,
        overrides=[
            f"data.folders=[{{root: {dataset_root}}}]",
            "data.synthesize=null",
            f"run.output_dir={output}",
            "run.batch_size=4",
            "run.log_every=1",
            *overrides,
        ],
    )


def test_objective_matches_the_models_own_image_path(tiny_no_roi):
    model, processor = tiny_no_roi
    images = [defect_image(90, 150, seed=1), defect_image(56, 56, seed=2, defect=False)]
    batch = ExpertCollator(processor)([(image, 0, None) for image in images])
    with torch.no_grad():
        analysis = ExpertObjective(model, train_vision=False)(
            batch["pixel_values"], batch["image_sizes"], batch["source_sizes"]
        )
        reference = model.encode_images(**processor.preprocess_images([[image] for image in images])).analysis
    torch.testing.assert_close(analysis.expert.logits, reference.logits)
    assert len(analysis.heatmaps) == len(reference.heatmaps) == len(images)
    for ours, theirs in zip(analysis.heatmaps, reference.heatmaps):
        torch.testing.assert_close(ours, theirs)


def test_loss_goes_down_and_only_the_expert_changes(dataset_root, tmp_path):
    summary = train_expert(
        config(
            dataset_root, tmp_path, "run.max_steps=24", "run.checkpoint_every=0",
            "schedule.name=constant", "optim.lr=1e-2",
        )
    )
    assert summary.steps == 24 and len(summary.losses) == 24
    assert sum(summary.losses[-5:]) / 5 < sum(summary.losses[:5]) / 5 - 0.05
    trained = AssistantForConditionalGeneration.from_pretrained(tmp_path / "final")
    initial, _ = tiny_assistant(seed=0, roi=False)
    for name, weight in initial.state_dict().items():
        same = torch.equal(weight, trained.state_dict()[name])
        assert same != name.startswith("model.anomaly_expert."), name
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 24 and '"bce"' in records[0] and '"mask"' in records[0]


def test_train_vision_also_updates_the_tower(dataset_root, tmp_path):
    train_expert(
        config(dataset_root, tmp_path, "run.max_steps=2", "run.checkpoint_every=2", "objective.train_vision=true")
    )
    weights = load_file(str(checkpoint_dir(tmp_path, 2) / "model.safetensors"))
    assert (
        any(name.startswith("vision_tower.") for name in weights)
        and any(name.startswith("anomaly_expert.") for name in weights)
    )
    initial, _ = tiny_assistant(seed=0, roi=False)
    tower = initial.model.vision_tower.state_dict()
    changed = [name for name in tower if not torch.equal(tower[name], weights[f"vision_tower.{name}"])]
    assert changed


def test_resume_gives_the_same_losses_and_weights(dataset_root, tmp_path):
    """2N steps straight vs N steps, stop, resume: the same next losses and final weights
    (mid-epoch, synthetic defects on)."""
    straight = train_expert(config(dataset_root, tmp_path / "a", "run.max_steps=6", "run.checkpoint_every=3"))
    resumed_config = config(dataset_root, tmp_path / "b", "run.max_steps=6", "run.checkpoint_every=3")
    resumed = train_expert(resumed_config, resume=checkpoint_dir(tmp_path / "a", 3))
    assert resumed.losses == straight.losses[3:]
    final_a = load_file(str(checkpoint_dir(tmp_path / "a", 6) / "model.safetensors"))
    final_b = load_file(str(checkpoint_dir(tmp_path / "b", 6) / "model.safetensors"))
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert latest_checkpoint(tmp_path / "b") == checkpoint_dir(tmp_path / "b", 6)


def test_resume_drops_later_and_cut_off_metric_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed while writing step 4
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_one_class_data_is_a_clear_error():
    with pytest.raises(DataError, match="needs normal and anomalous images"):
        class_weights(0.0)
    assert class_weights(0.25) == pytest.approx((2 / 3, 2.0))


def test_cli_runs_end_to_end_and_resumes(dataset_root, tmp_path, capsys):
    argv = [
        "train", "expert", "--config", str(TINY_CONFIG),
        "--set", f"data.folders=[{{root: {dataset_root}}}]", "--set", "data.synthesize=null",
    ]
    argv += [
        "--set", f"run.output_dir={tmp_path}", "--set", "run.max_steps=3",
        "--set", "run.checkpoint_every=2", "--set", "run.batch_size=4",
    ]
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert "expert training finished" in output and "steps            3" in output and "trainable params" in output
    assert main([*argv, "--set", "run.max_steps=4", "--resume"]) == 0
    assert "steps            4" in capsys.readouterr().out
    assert main(["train", "expert", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_crop_targets_mark_the_patch_of_a_defect_smaller_than_a_patch():
    mask = torch.zeros(60, 150)  # wide: the 2 x 3 tile grid is padded above and below the image
    mask[31:33, 100:102] = 1  # 2 x 2 px, far below one patch
    targets = crop_targets(mask, (60, 150), (2, 3), side=4)
    assert targets.shape == (7, 4, 4)
    assert targets[0].nonzero().tolist() == [[2, 2]]  # base crop: the whole image squeezed to 4 x 4 patches
    tiles = targets[1:].view(2, 3, 4, 4).permute(0, 2, 1, 3).reshape(8, 12)
    # 150 px wide -> 12 patch columns, 60 px -> 4 patch rows centred in 8: rows 2..5 hold the image, the rest padding.
    assert tiles.nonzero().tolist() == [[4, 8]]
    heatmap = assemble_heatmap(targets, (60, 150), (2, 3), (60, 150))
    peak = divmod(int(heatmap.argmax()), 150)
    assert abs(peak[0] - 32) <= 8 and abs(peak[1] - 101) <= 8


def test_patch_loss_weighs_every_image_and_every_defect_equally():
    maps = [
        torch.tensor([[[0.9, 0.2], [0.2, 0.2]]]),
        torch.full((1, 2, 2), 0.1),
        torch.tensor([[[0.5, 0.5], [0.5, 0.2]]]),
    ]
    targets = [torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])]
    log = torch.log
    # each image's clean patches as one mean: three clean patches of the first image weigh as the one of the third
    clean = -(log(torch.tensor(0.8)) + log(torch.tensor(0.9)) + log(torch.tensor(0.8)))
    # the one-patch defect weighs as much as the three-patch one
    defective = -(log(torch.tensor(0.9)) + log(torch.tensor(0.5)))
    clean_sum, defective_sum = patch_mask_loss(maps, targets)
    torch.testing.assert_close((clean_sum, defective_sum), (clean, defective))
    assert mask_counts(targets) == (3, 2)
    assert [float(total) for total in patch_mask_loss(maps, [None, None, None])] == [0.0, 0.0]


def test_patch_level_mask_loss_trains(dataset_root, tmp_path):
    summary = train_expert(
        config(dataset_root, tmp_path, "run.max_steps=2", "run.checkpoint_every=0", "objective.mask_level=patch")
    )
    assert summary.steps == 2
    assert '"mask"' in (tmp_path / "metrics.jsonl").read_text().splitlines()[0]


def test_a_checkpoint_appears_whole_or_not_at_all(dataset_root, tmp_path, monkeypatch):
    """A kill while step 4 is saved leaves step 2 the latest checkpoint, and the next save cleans up."""
    import training.loop

    run = config(dataset_root, tmp_path, "run.max_steps=4", "run.checkpoint_every=2")
    real_publish = training.loop.publish_dir

    def killed_at_step_4(partial, folder):
        if folder.name.endswith("4"):
            raise KeyboardInterrupt
        return real_publish(partial, folder)

    monkeypatch.setattr(training.loop, "publish_dir", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_expert(run)
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    assert (tmp_path / "checkpoints" / "step-000004.partial").is_dir()
    monkeypatch.setattr(training.loop, "publish_dir", real_publish)
    train_expert(
        config(dataset_root, tmp_path, "run.max_steps=4", "run.checkpoint_every=2"), resume=checkpoint_dir(tmp_path, 2)
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_recovery(dataset_root, tmp_path, capsys):
    argv = ["train", "expert", "--config", str(TINY_CONFIG), "--set", f"data.folders=[{{root: {dataset_root}}}]"]
    argv += ["--set", "data.synthesize=null", "--set", f"run.output_dir={tmp_path}", "--set", "run.max_steps=2"]
    argv += ["--set", "run.checkpoint_every=1", "--set", "run.batch_size=4"]
    assert main(argv) == 0
    optimizer = checkpoint_dir(tmp_path, 2) / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated, as by a disk that filled up
    capsys.readouterr()
    assert main([*argv, "--set", "run.max_steps=3", "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "step-000002: checkpoint is damaged" in error and "delete that folder" in error
    shutil.rmtree(checkpoint_dir(tmp_path, 2))  # the recovery it names: resume from the one before
    assert main([*argv, "--set", "run.max_steps=3", "--resume"]) == 0
