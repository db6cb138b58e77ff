"""Training at scale, on CPU: the loss is a mean over the whole optimizer step's items (accumulation and processes
change nothing), two processes (`accelerate launch`, gloo) train like one and resume exactly, and step
checkpoints rotate."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from data.synth_dataset import SynthSpec, write_synthetic_dataset
from tests.helpers import defect_image
from training import loop
from training.checkpoint import checkpoint_dir, rotate_checkpoints, step_checkpoints
from training.config import parse_config
from training.expert import train_expert
from training.instruct import train_instruct

ROOT = Path(__file__).parents[1]
CPU_DDP = ROOT / "training" / "accelerate" / "cpu_ddp.yaml"

# Answers of very different lengths: a micro-batch mean would weigh the one-word answers like the paragraph.
ANSWERS = [
    ("Yes", "There is a long scratch from the top left corner down to the middle, with two small dents beside it."),
    ("No", "Normal."),
    ("Yes", "A dent."),
    ("No", "The surface is clean and even all over; nothing is out of place and the edges are straight."),
]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-instruct")
    records = []
    for index, (verdict, description) in enumerate(ANSWERS):
        defect_image(56, 56, seed=index, defect=verdict == "Yes").save(root / f"{index}.png")
        turns = [("<image>\nAre there any defects?", verdict), ("Describe it.", description)]
        conversation = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        records.append({"id": f"s{index}", "image": f"{index}.png", "conversations": conversation})
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-expert")
    spec = SynthSpec(categories=["textile"], train_good=6, test_good=1, test_defective=1, size=56)
    write_synthetic_dataset(root, spec)
    return root


def instruct_config(conversations: Path, output: Path, **run) -> dict:
    return {
        "stage": "instruct",
        "model": {"tiny": True, "seed": 0, "settings": {"roi": {"enabled": False}}},
        "data": {"json_path": str(conversations)},
        "run": {"output_dir": str(output), "max_steps": 4, "checkpoint_every": 2, "log_every": 1, **run},
        "optim": {"lr": 5e-3},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # dropout draws differ by batch shape and process
        "objective": {"projector_lr": 2e-3, "merge": False},
    }


def expert_config(images: Path, output: Path, **run) -> dict:
    return {
        "stage": "expert",
        "model": {"tiny": True, "seed": 0, "settings": {"roi": {"enabled": False}}},
        "data": {"folders": [{"root": str(images)}], "synthetic_anomalies": 0.5},
        "run": {"output_dir": str(output), "max_steps": 2, "checkpoint_every": 2, "log_every": 1, **run},
        "optim": {"lr": 3e-3},
        "objective": {"mask_loss_weight": 1.0, "mask_level": "patch"},
    }


def step_gradients(monkeypatch, train, config: dict) -> list[torch.Tensor]:
    """The gradients the optimizer steps apply (plain SGD in place of AdamW records them)."""
    grads = []  # every step's, in order

    class Recording(torch.optim.SGD):
        def __init__(self, groups, lr, **_):
            super().__init__(groups, lr=lr)

        def step(self, closure=None):
            grads.extend(p.grad.clone() for group in self.param_groups for p in group["params"])
            return super().step(closure)

    monkeypatch.setattr(loop.torch.optim, "AdamW", Recording)
    train(parse_config(config))
    return grads


@pytest.mark.parametrize("stage", ["instruct", "expert"])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(stage, monkeypatch, conversations, images, tmp_path):
    train, make, data = {
        "instruct": (train_instruct, instruct_config, conversations),
        "expert": (train_expert, expert_config, images),
    }[stage]
    # stage 1: one image per micro-batch, so their counts of defective images differ (0 or 1)
    size = 2 if stage == "instruct" else 4
    settings = {"max_steps": 1, "checkpoint_every": 0, "max_grad_norm": None}
    whole = step_gradients(monkeypatch, train, make(data, tmp_path / "a", batch_size=size, grad_accum=1, **settings))
    split = step_gradients(monkeypatch, train, make(data, tmp_path / "b", batch_size=1, grad_accum=size, **settings))
    assert len(whole) == len(split) > 0 and any(bool(g.abs().sum()) for g in whole)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_a_step_cut_short_by_the_epoch_end_weighs_its_own_tokens(monkeypatch, conversations, tmp_path):
    """Three conversations, two per step: the second step holds one micro-batch whichever way it is split."""
    three = tmp_path / "three.json"
    three.write_text(json.dumps(json.loads(conversations.read_text())[:3]))
    for image in conversations.parent.glob("*.png"):
        (tmp_path / image.name).symlink_to(image)
    settings = {"max_steps": 2, "checkpoint_every": 0, "max_grad_norm": None}
    whole = step_gradients(
        monkeypatch, train_instruct, instruct_config(three, tmp_path / "a", batch_size=2, **settings)
    )
    split = step_gradients(
        monkeypatch, train_instruct, instruct_config(three, tmp_path / "b", batch_size=1, grad_accum=2, **settings)
    )
    assert len(whole) == len(split)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: dict, path: Path, *extra: str) -> None:
    """`accelerate launch` two CPU processes of `anomaly-assistant train` on `config`."""
    path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_DDP),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "assistant",
        "train",
        config["stage"],
        "--config",
        str(path),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def losses(output: Path) -> list[tuple[int, float]]:
    return [(record["step"], record["loss"]) for record in records(output)]


def assert_same_gradient_norms(a: Path, b: Path) -> None:
    """The gradient's size, which AdamW's weights would not show: a wrong process factor changes it."""
    norms = [[record["grad_norm"] for record in records(output)] for output in (a, b)]
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)


def weights(output: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir(output, step) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # Adam magnifies fp noise of ~0 gradients


def test_two_processes_train_stage_2_like_one_and_resume_exactly(conversations, tmp_path):
    one = tmp_path / "one"
    train_instruct(parse_config(instruct_config(conversations, one, batch_size=2)))
    two = tmp_path / "two"
    launch(instruct_config(conversations, two, batch_size=1), tmp_path / "two.yaml")

    # every step logged once (only the main process writes), with the loss of the one-process run
    assert [step for step, _ in losses(two)] == [1, 2, 3, 4]
    torch.testing.assert_close([loss for _, loss in losses(two)], [loss for _, loss in losses(one)], rtol=1e-6, atol=0)
    assert_same_weights(weights(two, 4), weights(one, 4))
    assert_same_gradient_norms(two, one)
    assert sorted(p.name for p in checkpoint_dir(two, 4).iterdir() if p.name.startswith("random_states")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(two.rglob("*.partial"))

    # resumed in two processes from step 2: the same steps 3-4; checkpoints each step, only the newest kept
    resumed = tmp_path / "resumed"
    launch(
        instruct_config(conversations, resumed, batch_size=1, checkpoint_every=1, keep_last=1),
        tmp_path / "resumed.yaml",
        "--resume",
        str(checkpoint_dir(two, 2)),
    )
    assert losses(resumed) == losses(two)[2:]
    assert_same_weights(weights(resumed, 4), weights(two, 4), exact=True)
    assert step_checkpoints(resumed) == [checkpoint_dir(resumed, 4)]


def test_two_processes_train_stage_1_like_one(images, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_expert(parse_config(expert_config(images, one, batch_size=4)))
    launch(expert_config(images, two, batch_size=2), tmp_path / "two.yaml")
    assert [step for step, _ in losses(two)] == [1, 2]
    torch.testing.assert_close([loss for _, loss in losses(two)], [loss for _, loss in losses(one)], rtol=1e-6, atol=0)
    assert_same_weights(weights(two, 2), weights(one, 2))
    assert_same_gradient_norms(two, one)
    assert (two / "final" / "config.json").is_file()


def test_rotation_keeps_the_newest_and_the_checkpoint_a_run_resumed_from(tmp_path):
    for step in (1, 2, 3, 4, 5):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    left_over = checkpoint_dir(tmp_path, 2).with_name("step-000002.removing")  # a kill mid-delete, earlier
    left_over.mkdir()
    removed = rotate_checkpoints(checkpoint_dir(tmp_path, 5), keep_last=2, resumed_from=checkpoint_dir(tmp_path, 1))
    assert removed == [checkpoint_dir(tmp_path, 2), checkpoint_dir(tmp_path, 3)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000004", "step-000005"]


def test_rotation_never_deletes_what_was_just_saved_nor_later_steps_of_another_run(tmp_path):
    """Resumed from step 4 of a run that had reached step 10: saving step 6 keeps 6 (and 4, the resumed one)."""
    for step in (2, 4, 8, 10):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    checkpoint_dir(tmp_path, 6).mkdir()
    removed = rotate_checkpoints(checkpoint_dir(tmp_path, 6), keep_last=1, resumed_from=checkpoint_dir(tmp_path, 4))
    assert removed == [checkpoint_dir(tmp_path, 2)]
    assert step_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, step) for step in (4, 6, 8, 10)]


def test_keep_last_must_be_positive(conversations, tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        parse_config(instruct_config(conversations, tmp_path, keep_last=0))


def test_loader_workers_are_configurable_and_change_no_batch(conversations, tmp_path):
    from training.config import RunConfig
    from training.datasets import InstructDataset

    dataset = InstructDataset([])  # samples that ignore the epoch
    assert loop.loader_options(RunConfig(num_workers="auto"), dataset, on_cuda=False) == {
        "num_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
    }
    assert loop.loader_options(RunConfig(), dataset, on_cuda=True) == {
        "num_workers": 2,
        "pin_memory": True,
        "persistent_workers": True,
    }
    options = loop.loader_options(RunConfig(num_workers=1, persistent_workers=False), dataset, on_cuda=False)
    assert options["persistent_workers"] is False
    with pytest.raises(ValueError):
        RunConfig(num_workers=-1)
    runs = [
        train_instruct(parse_config(instruct_config(conversations, tmp_path / str(n), batch_size=2, num_workers=n)))
        for n in (0, 1)
    ]
    assert runs[0].losses == runs[1].losses


def test_stage_1_workers_draw_each_epochs_synthetic_defects(images, tmp_path):
    """Stage 1's synthetic defects depend on the epoch; a worker must see each epoch's (no persistent copy)."""
    runs = [
        train_expert(parse_config(expert_config(images, tmp_path / str(n), batch_size=4, max_steps=6, num_workers=n)))
        for n in (0, 1)
    ]
    assert runs[0].losses == runs[1].losses
