"""`anomaly-assistant serve`: the vLLM command line it builds and its refusal when vLLM is missing (no server)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from assistant.cli import build_parser, main
from assistant.serve.cli import server_command, server_environment


def parse(*argv: str):
    return build_parser().parse_args(["serve", "--model", "m", *argv])


def test_cpu_command_line_and_environment():
    args = parse("--api-key", "sk-1", "--max-model-len", "2048", "--kv-cache-gib", "2", "--", "--block-size", "32")
    command = server_command(args, "/models/m", "/venv/bin/python", cpu=True)
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    options = dict(zip(command[3::2], command[4::2]))
    assert options["--host"] == "127.0.0.1" and options["--served-model-name"] == "anomaly-assistant"
    assert json.loads(options["--limit-mm-per-prompt"]) == {"image": 4}
    assert "--enforce-eager" in command and command[-2:] == ["--block-size", "32"]
    assert "sk-1" not in command  # the key travels in the environment, not where `ps` shows it
    env = server_environment(args, cpu=True)
    assert env["VLLM_API_KEY"] == "sk-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert set(env["VLLM_PLUGINS"].split(",")) == {
        "anomaly_assistant",
        "anomaly_assistant_inspect",
        "anomaly_assistant_auth",
    }
    assert env["VLLM_MEDIA_CONNECTOR"] == "anomaly_assistant" and env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert "--allowed-media-domains" not in command  # no image URL is fetched unless asked for


def test_image_domains_are_opt_in():
    args = parse("--allow-image-domain", "images.example.com", "--allow-image-domain", "10.0.0.7")
    command = server_command(args, "/models/m", "python", cpu=True)
    at = command.index("--allowed-media-domains")
    assert command[at + 1 : at + 3] == ["images.example.com", "10.0.0.7"]


def test_gpu_command_line_keeps_cuda_graphs_and_needs_no_key():
    args = parse("--dtype", "bfloat16")
    command = server_command(args, "/models/m", "python", cpu=False)
    assert "--enforce-eager" not in command and "--max-model-len" not in command
    env = server_environment(args, cpu=False)
    assert "VLLM_API_KEY" not in env and "VLLM_CPU_KVCACHE_SPACE" not in env


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this interpreter has vLLM: serve would start")
def test_serve_explains_when_vllm_is_missing(tiny_path, capsys):
    assert main(["serve", "--model", str(tiny_path), "--python", sys.executable]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("damaged", ["model_card.json", "domain.safetensors"])
def test_serve_refuses_a_damaged_card_or_domain_before_starting(tiny_path, tmp_path, capsys, damaged):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    (model / damaged).write_text("{ not what it should be")
    assert main(["serve", "--model", str(model), "--python", sys.executable]) == 2
    assert capsys.readouterr().err.startswith(f"error: {model / damaged}: ")
