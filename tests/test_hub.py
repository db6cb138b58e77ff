"""Real weights through the real download code (`assistant.hub`): a preset pulled from a loopback fake Hub (a tiny
llava-hf repository through huggingface_hub, a tiny official-layout expert file from a raw-file URL), converted once
and cached; resume, digest mismatch, 404, a stopped server and offline mode each end in one line that says what to
fetch, from where and where to put it; `--model` and `convert --llava` take Hub ids; the app starts on a preset.

A test preset (`tiny-ov`) has the shape of `anomaly-ov-0.5b` (kind "pulled", llava-hf repo + expert file, token
parts "base") with tiny files, since the real presets' digests pin the real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch
from huggingface_hub import constants

from assistant import cli, hub
from assistant.checkpoint import load_checkpoint
from assistant.defaults import resolve_model
from assistant.errors import UsageError
from assistant.factory import save_assistant
from assistant.files import CACHE_ENV
from assistant.presets import EXPERT_ENDPOINT_ENV, PRESETS, TINY_EXPERT, TINY_ROI, ExpertDownload, Preset
from assistant.serve.process import free_port
from tests.fake_hub import FakeHub, hub_environment, skip_retry_waits
from tests.helpers import ROOT, official_expert_state, save_tiny_llava, wait_for_app

LLAVA_REPO = "llava-hf/tiny-ov-hf"
EXPERT_REPOSITORY, EXPERT_COMMIT = "acme/Anomaly-OV", "0123456789abcdef0123456789abcdef01234567"


def expert_bytes(tmp_path, seed: int = 0) -> bytes:
    path = tmp_path / f"expert-{seed}.pth"
    torch.save(official_expert_state(seed=seed), path)
    return path.read_bytes()


def tiny_ov_preset(expert: bytes) -> Preset:
    from tests.fake_hub import _git_blob_id

    return Preset(
        "tiny-ov",
        "a tiny llava-hf LLaVA-OneVision + an official-layout expert (tests)",
        "pulled",
        {},
        {},
        expert=TINY_EXPERT,
        roi=TINY_ROI,
        llava_repo=LLAVA_REPO,
        expert_file=ExpertDownload(
            "pretrained_expert_tiny.pth", _git_blob_id(expert), EXPERT_REPOSITORY, EXPERT_COMMIT
        ),
        token_parts=("base",),
    )


@pytest.fixture(scope="module")
def llava_files(tmp_path_factory):
    """The files of a tiny llava-hf checkpoint, as its Hub repository holds them, and the model."""
    folder = tmp_path_factory.mktemp("llava") / "tiny-ov-hf"
    model = save_tiny_llava(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}, model


@pytest.fixture
def fake(tmp_path, monkeypatch, llava_files):
    """The fake Hub serving the tiny llava-hf repository and the expert file, the environment pointed at it, and
    the `tiny-ov` preset registered: (hub, preset, expert bytes, the repository's commit)."""
    files, _ = llava_files
    expert = expert_bytes(tmp_path)
    preset = tiny_ov_preset(expert)
    with FakeHub() as server:
        hub_environment(monkeypatch, server, tmp_path / "hf")
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / "assistant-cache"))
        monkeypatch.setenv(EXPERT_ENDPOINT_ENV, server.url)
        monkeypatch.setitem(PRESETS, preset.name, preset)
        sha = server.add_repo(LLAVA_REPO, files)
        server.add_file(f"{EXPERT_REPOSITORY}/{EXPERT_COMMIT}/{preset.expert_file.filename}", expert)
        yield server, preset, expert, sha


def set_offline(monkeypatch, on: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)  # what huggingface_hub reads, at call time


def expert_gets(server: FakeHub) -> list[str | None]:
    return [rng for method, path, rng in server.requests if method == "GET" and path.endswith(".pth")]


def test_pull_fetches_converts_once_and_later_runs_contact_nothing(fake, llava_files, monkeypatch, capsys):
    server, preset, _, sha = fake
    assert cli.main(["pull", "tiny-ov"]) == 0
    out, err = capsys.readouterr()
    folder = hub.model_folder("tiny-ov")
    assert out.strip() == str(folder)
    assert "pretrained_expert_tiny.pth" in err  # the expert's progress bar
    assert expert_gets(server) == [None]
    pulled = json.loads((folder / hub.PULLED_FILE).read_text())
    assert pulled["llava"] == LLAVA_REPO and pulled["expert_git_blob"] == preset.expert_file.git_blob
    assert pulled["llava_commit"] == sha
    # The expert is cached under its digest, the converted folder beside the other models, nothing half-made left.
    assert hub.expert_path(preset.expert_file).is_file()
    assert sorted(path.name for path in folder.parent.iterdir()) == ["tiny-ov"]

    # The conversion: llava-hf weights as they were, the official expert loaded, the LLM's token parts recorded.
    model, processor = load_checkpoint(folder)
    _, base = llava_files
    ours = model.state_dict()
    for key, tensor in base.state_dict().items():
        assert torch.equal(ours[key], tensor), key
    official = official_expert_state()
    assert torch.equal(model.anomaly_expert.ltfm.token_pooling.weight, official["pooling_layer.0.weight"])
    assert model.config.llm_token_parts == ["base"] and model.config.token_parts == ["base"]
    assert model.config.expert.feature_layers == [1, 2, 3, 4]  # the preset's setting for the tiny tower

    # Later: the preset name, `pull` again and offline mode all give the converted folder without a request.
    server.requests.clear()
    assert resolve_model("tiny-ov") == folder
    assert cli.main(["pull", "tiny-ov"]) == 0
    set_offline(monkeypatch, True)
    assert resolve_model("tiny-ov") == folder
    assert server.requests == []
    # --force converts again from the caches (the Hub is asked only whether the snapshot is current).
    set_offline(monkeypatch, False)
    assert cli.main(["pull", "tiny-ov", "--force"]) == 0
    assert expert_gets(server) == []


def test_an_interrupted_expert_download_resumes_with_a_range_request(fake, tmp_path):
    server, preset, expert, _ = fake
    cut = len(expert) // 3
    server.cut_after = cut
    with pytest.raises(hub.DownloadError) as caught:
        hub.download_expert(preset.expert_file)
    message = str(caught.value)
    assert "\n" not in message and "run again to resume" in message
    assert str(hub.expert_path(preset.expert_file)) in message and preset.expert_file.page in message
    partial = hub.expert_path(preset.expert_file).with_name("pretrained_expert_tiny.pth.part")
    assert partial.stat().st_size == cut
    server.cut_after = None
    assert hub.download_expert(preset.expert_file).read_bytes() == expert
    assert expert_gets(server) == [None, f"bytes={cut}-"]
    assert not partial.exists()


def test_a_file_that_does_not_match_its_published_digest_is_refused_and_not_kept(fake, tmp_path):
    server, preset, _, _ = fake
    server.add_file(f"{EXPERT_REPOSITORY}/{EXPERT_COMMIT}/{preset.expert_file.filename}", expert_bytes(tmp_path, 1))
    with pytest.raises(hub.DownloadError, match=f"the repository's tree says {preset.expert_file.git_blob}"):
        hub.download_expert(preset.expert_file)
    folder = hub.expert_path(preset.expert_file).parent
    assert list(folder.iterdir()) == []
    with pytest.raises(hub.DownloadError):  # and so the preset is not converted with it
        hub.pull("tiny-ov")
    assert not hub.model_folder("tiny-ov").exists()


def test_missing_files_and_repositories_are_one_line_errors(fake, monkeypatch, capsys):
    server, preset, _, _ = fake
    missing = Preset(**{**preset.__dict__, "name": "tiny-ov-gone", "llava_repo": "llava-hf/gone"})
    monkeypatch.setitem(PRESETS, missing.name, missing)
    assert cli.main(["pull", "tiny-ov-gone"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: llava-hf/gone: no such repository on {server.url} (a private or gated one needs HF_TOKEN)"

    renamed = ExpertDownload("pretrained_expert_other.pth", preset.expert_file.git_blob, EXPERT_REPOSITORY, "f" * 40)
    with pytest.raises(hub.DownloadError) as caught:
        hub.download_expert(renamed)
    assert "HTTP 404" in str(caught.value) and renamed.url in str(caught.value) and "\n" not in str(caught.value)


def test_a_stopped_server_names_what_to_download_and_where_to_put_it(fake, monkeypatch, capsys):
    server, preset, _, _ = fake
    skip_retry_waits(monkeypatch)
    server.stop()
    assert cli.main(["pull", "tiny-ov"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {LLAVA_REPO} is not in the Hugging Face cache and ")
    assert f"{server.url} cannot be reached" in err[0] and f"hf download {LLAVA_REPO}" in err[0]
    assert constants.HF_HUB_CACHE in err[0]
    with pytest.raises(hub.DownloadError, match="ConnectError") as caught:
        hub.download_expert(preset.expert_file)
    assert str(hub.expert_path(preset.expert_file)) in str(caught.value)
    assert not hub.model_folder("tiny-ov").exists()


def test_offline_mode_sends_nothing_and_says_what_is_missing(fake, monkeypatch, capsys, image_file):
    server, preset, _, _ = fake
    set_offline(monkeypatch, True)
    assert cli.main(["inspect", image_file, "--model", "tiny-ov"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {LLAVA_REPO} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: ")
    with pytest.raises(hub.DownloadError) as caught:
        hub.download_expert(preset.expert_file)
    message = str(caught.value)
    assert message == (
        f"pretrained_expert_tiny.pth is not cached and HF_HUB_OFFLINE is set: download {preset.expert_file.page} "
        f"and put it at {hub.expert_path(preset.expert_file)}"
    )
    assert server.requests == []
    # With both downloads in their caches, offline mode converts without a request.
    set_offline(monkeypatch, False)
    hub.snapshot(LLAVA_REPO)
    hub.download_expert(preset.expert_file)
    set_offline(monkeypatch, True)
    server.requests.clear()
    assert (hub.pull("tiny-ov") / "config.json").is_file()
    assert server.requests == []


def test_hub_ids_as_model_and_convert_sources(fake, tiny, tmp_path, image_file, capsys):
    server, preset, _, _ = fake
    # A llava-hf repository no preset builds on: converted once, with a random expert its card admits.
    server.add_repo("acme/llava-plain", server_files(server, LLAVA_REPO))
    assert cli.main(["inspect", image_file, "--model", "acme/llava-plain", "--max-new-tokens", "2"]) == 0
    converted = [path for path in (hub.cache_dir() / "models").iterdir() if path.name.startswith("hub--acme--")]
    assert len(converted) == 1
    assert "random expert" in json.loads((converted[0] / "model_card.json").read_text())["name"]
    # The llava-hf repository of a preset is that preset.
    assert resolve_model(LLAVA_REPO) == hub.model_folder("tiny-ov")
    # An assistant checkpoint on the Hub is used as it is.
    saved = save_assistant(*tiny, tmp_path / "assistant")
    server.add_repo("acme/assistant", {path.name: path.read_bytes() for path in saved.iterdir()})
    folder = resolve_model("acme/assistant")
    assert folder.parent.name == "snapshots" and (folder / "config.json").is_file()
    # Not a model the assistant reads, and a name that is neither folder, preset nor Hub id.
    server.add_repo("acme/bert", {"config.json": b'{"model_type": "bert"}'})
    with pytest.raises(hub.DownloadError, match="acme/bert: a bert model, not an assistant or a llava-hf"):
        resolve_model("acme/bert")
    with pytest.raises(UsageError, match="no such folder, preset"):
        resolve_model("not-a-model")
    # convert: a Hub id and the expert by its URL (the digest checked), token parts as the LLM was trained.
    out = tmp_path / "converted"
    args = ["convert", "--llava", LLAVA_REPO, "--expert", preset.expert_file.url, "--out", str(out)]
    assert cli.main(args) == 0
    capsys.readouterr()
    model, _ = load_checkpoint(out)
    assert model.config.token_parts == ["base"]
    official = official_expert_state()
    assert torch.equal(model.anomaly_expert.ltfm.token_pooling.weight, official["pooling_layer.0.weight"])


def server_files(server: FakeHub, repo_id: str) -> dict[str, bytes]:
    """A repository's files as served (to publish a copy under another name)."""
    names = [entry["path"] for entry in httpx.get(f"{server.url}/api/models/{repo_id}/tree/main").json()]
    url = f"{server.url}/{repo_id}/resolve/main"
    return {name: httpx.get(f"{url}/{name}", follow_redirects=True).content for name in names}


APP_LAUNCHER = """
import sys
from assistant.presets import register
from tests.test_hub import tiny_ov_preset
register(tiny_ov_preset(open(sys.argv[1], "rb").read()))
import app
sys.exit(app.main(sys.argv[2:]))
"""


def test_the_app_pulls_converts_and_answers_on_a_preset(fake, tmp_path, image_file):
    """`app.py --model PRESET` on a fresh machine: the weights come from the (fake) Hub and the expert URL through
    the environment a user sets (HF_ENDPOINT, HF_HOME, the expert endpoint), and the app answers."""
    from gradio_client import Client, handle_file

    server, _, expert, _ = fake
    expert_file = tmp_path / "expert.pth"
    expert_file.write_bytes(expert)
    port, log = free_port(), tmp_path / "app.log"
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "fresh-hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        CACHE_ENV: str(tmp_path / "fresh-cache"),
        EXPERT_ENDPOINT_ENV: server.url,
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-c", APP_LAUNCHER, str(expert_file), "--model", "tiny-ov", "--port", str(port),
               "--max-new-tokens", "4", "--device", "cpu"]
    with log.open("w") as output:
        app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_app(app, port, log, timeout=180)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False, analytics_enabled=False)
        history, _, label, _, _, _ = client.predict(
            "Is there a defect?", handle_file(image_file), None, 0.5, api_name="/chat"
        )
        assert label["label"] in ("Normal", "Anomalous") and history[-1]["role"] == "assistant"
        folder = tmp_path / "fresh-cache" / "models" / "tiny-ov"
        assert f"backend: in-process model `{folder}`" in log.read_text()
        assert (tmp_path / "fresh-hf" / "hub" / "models--llava-hf--tiny-ov-hf").is_dir()
        assert expert_gets(server) == [None]
    finally:
        app.terminate()
        app.wait(10)
