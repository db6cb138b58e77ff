"""Stage 2: LoRA only on the LLM, loss going down, exact resume, adapter save/load/merge, QLoRA on CPU, the CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from assistant import AssistantForConditionalGeneration
from assistant.cli import main
from assistant.factory import tiny_assistant
from data.errors import DataError
from tests.helpers import defect_image
from training.checkpoint import checkpoint_dir
from training.collate import InstructCollator
from training.config import LoraSettings, load_config
from training.instruct import build_model, train_instruct
from training.loop import make_accelerator
from training.lora import apply_lora, load_adapter, merge_and_save, save_adapter
from training.models import NOT_QUANTISED, qlora_config

TINY_CONFIG = Path(__file__).parents[1] / "training" / "configs" / "tiny_instruct.yaml"


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """Four short labelled conversations about 56 px images."""
    root = tmp_path_factory.mktemp("instruct")
    records = []
    for index in range(4):
        anomalous = index % 2 == 1
        defect_image(56, 56, seed=index, defect=anomalous).save(root / f"{index}.png")
        turns = [("<image>\nAre there any defects?", "Yes" if anomalous else "No")]
        turns.append(("Describe it.", "There is a scratch on the top." if anomalous else "The part looks normal."))
        conversation = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        records.append({"id": f"s{index}", "image": f"{index}.png", "conversations": conversation})
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def config(conversations, output, *overrides):
    return load_config(
        TINY_CONFIG,
        overrides=[
            f"data.json_path={conversations}",
            "data.image_root=null",
            "data.synthesize=null",
            f"run.output_dir={output}",
            "run.batch_size=2",
            "run.grad_accum=1",
            "run.log_every=1",
            "run.gradient_checkpointing=false",
            "objective.merge=false",
            *overrides,
        ],
    )


def test_lora_wraps_only_language_model_linears_and_groups_the_rest(conversations, tmp_path):
    cfg = config(conversations, tmp_path, "objective.train_expert=selector")
    model, _, groups = build_model(cfg, make_accelerator(cfg.run))
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert wrapped and all(".model.language_model.layers." in name for name in wrapped)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(cfg.lora.target_modules)
    assert [g["name"] for g in groups] == ["lora", "projector", "expert"]
    assert [g["lr"] for g in groups] == [cfg.optim.lr, cfg.objective.projector_lr, cfg.objective.expert_lr]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert not any(
        "vision_tower" in name or "ltfm" in name or "lm_head" in name or "embed_tokens" in name for name in trainable
    )
    assert any("image_newline" in name for name in trainable) and any("selector" in name for name in trainable)


def test_loss_goes_down(conversations, tmp_path):
    summary = train_instruct(
        config(
            conversations, tmp_path, "run.max_steps=16", "run.checkpoint_every=0",
            "optim.lr=5e-3", "objective.projector_lr=5e-3",
        )
    )
    # A random tiny LM cannot get far below ln(vocab) = 6.2 (its frozen lm_head bounds the logits), but it moves.
    assert sum(summary.losses[-4:]) / 4 < sum(summary.losses[:4]) / 4 - 0.3
    assert summary.tokens_per_second > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "trained_modules.safetensors").is_file()


def test_resume_gives_the_same_losses_and_weights(conversations, tmp_path):
    """With LoRA dropout, shuffling and a warmup+cosine schedule, resuming at step N matches the straight run."""
    straight = train_instruct(
        config(
            conversations, tmp_path / "a", "run.max_steps=4", "run.checkpoint_every=2",
            "run.gradient_checkpointing=true",
        )
    )
    resumed = train_instruct(
        config(
            conversations, tmp_path / "b", "run.max_steps=4", "run.checkpoint_every=2",
            "run.gradient_checkpointing=true",
        ),
        resume=checkpoint_dir(tmp_path / "a", 2),
    )
    assert resumed.losses == straight.losses[2:]
    final_a = load_file(str(checkpoint_dir(tmp_path / "a", 4) / "model.safetensors"))
    final_b = load_file(str(checkpoint_dir(tmp_path / "b", 4) / "model.safetensors"))
    assert any("lora_A" in k for k in final_a) and any("multi_modal_projector" in k for k in final_a)
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_adapter_save_load_merge_round_trip(tmp_path):
    model, processor = tiny_assistant(seed=0, roi=False)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # B starts at zero: make the adapter matter
    projector = peft_model.base_model.model.model.multi_modal_projector
    projector.requires_grad_(True)
    torch.nn.init.normal_(projector.linear_2.weight, std=0.5)
    messages = [{"role": "user", "content": "<image>\nAny defect?"}, {"role": "assistant", "content": "Yes"}]
    batch = InstructCollator(processor)([(messages, [defect_image(56, 56)])])
    batch.pop("labels")
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        base_logits = tiny_assistant(seed=0, roi=False)[0](**batch).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)

    save_adapter(peft_model, processor, tmp_path / "adapter")
    loaded = load_adapter(tiny_assistant(seed=0, roi=False)[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected)
    merge_and_save(loaded, processor, tmp_path / "merged")
    merged = AssistantForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_qlora_quantises_only_the_language_model():
    """The skip list goes through transformers' own module replacement (which needs no GPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    model, _ = tiny_assistant(seed=0, roi=False)
    model = replace_with_bnb_linear(model, modules_to_not_convert=NOT_QUANTISED, quantization_config=qlora_config())
    quantised = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert quantised == {name for name in linears if name.startswith("model.language_model.")}
    assert quantised and "lm_head" not in quantised


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_without_cuda_is_a_clear_error(conversations, tmp_path, capsys):
    argv = [
        "train", "instruct", "--config", str(TINY_CONFIG),
        "--set", "lora.qlora=true", "--set", f"run.output_dir={tmp_path}",
    ]
    assert main(argv) == 2
    assert "lora.qlora: true needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "train_config.yaml").exists()


def test_missing_images_stop_training_before_it_starts(conversations, tmp_path):
    records = json.loads(conversations.read_text())
    records[2]["image"] = "gone.png"
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    for index in (0, 1, 3):
        (tmp_path / f"{index}.png").write_bytes((conversations.parent / f"{index}.png").read_bytes())
    with pytest.raises(DataError, match=r"train\.json\[2\] id=s2: .*gone\.png"):
        train_instruct(config(path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_runs_end_to_end_and_the_merged_model_loads(conversations, tmp_path, capsys):
    argv = [
        "train", "instruct", "--config", str(TINY_CONFIG),
        "--set", f"data.json_path={conversations}", "--set", "data.image_root=null",
    ]
    argv += [
        "--set", "data.synthesize=null", "--set", f"run.output_dir={tmp_path}",
        "--set", "run.max_steps=2", "--set", "run.batch_size=2",
    ]
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert "instruct training finished" in output and "tokens/s" in output and "steps            2" in output
    merged = AssistantForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert merged.config.roi.enabled is False
    assert main(["train", "merge", str(tmp_path / "adapter"), "--output", str(tmp_path / "again")]) == 0
    first = load_file(str(tmp_path / "merged" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first and first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
