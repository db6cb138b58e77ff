"""The fake Hub (tests/fake_hub.py) is faithful for huggingface_hub's own download code (2.4): snapshot_download and
hf_hub_download succeed against it, a cut transfer fails and heals the way the client handles it, and unknown repos,
a stopped server and offline mode raise what the client raises against the real Hub."""

from __future__ import annotations

import hashlib
import random
import socket
from pathlib import Path

import httpx
import httpx2
import pytest
from huggingface_hub import constants, errors, hf_hub_download, snapshot_download

from tests.fake_hub import CDN_PREFIX, FakeHub, hub_environment, skip_retry_waits

REPO = "acme/tiny-llava"
BIG = random.Random(0).randbytes(300_000)
FILES = {
    "config.json": b'{"model_type": "llava_onevision"}',
    "model.safetensors": BIG,
    "tokenizer.json": b'{"version": "1.0"}',
    "README.md": b"# not asked for\n",
}
PATTERNS = ["*.json", "*.safetensors"]  # what the assistant asks for: everything but README.md
CUT = 100_000


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub() as hub:
        hub_environment(monkeypatch, hub, tmp_path / "hf")
        yield hub


def gets_of_big_file(hub: FakeHub) -> list[str | None]:
    """The Range header of each GET of model.safetensors' bytes (on the CDN it is redirected to)."""
    return [rng for method, path, rng in hub.requests if method == "GET" and path.startswith(CDN_PREFIX)]


def assert_snapshot(folder: str | Path, sha: str) -> None:
    folder = Path(folder)
    assert folder.name == sha and folder.parent.name == "snapshots"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).read_bytes() == FILES[name], name
    assert not (folder / "README.md").exists()


def test_snapshot_download_gets_the_files(hub, tmp_path):
    sha = hub.add_repo(REPO, FILES)
    folder = snapshot_download(REPO, allow_patterns=PATTERNS)
    assert_snapshot(folder, sha)
    assert Path(folder).is_relative_to(tmp_path / "hf" / "hub")
    # The blobs are named as with the real Hub: an LFS file by its sha256 (X-Linked-Etag), others by git blob id.
    blobs = {path.name for path in (tmp_path / "hf" / "hub" / "models--acme--tiny-llava" / "blobs").iterdir()}
    config_blob = hashlib.sha1(b"blob %d\0" % len(FILES["config.json"]) + FILES["config.json"]).hexdigest()
    assert {hashlib.sha256(BIG).hexdigest(), config_blob} <= blobs
    requests = [(method, path.replace(sha, "SHA")) for method, path, _ in hub.requests]
    assert requests[:2] == [("GET", f"/api/models/{REPO}/revision/main"), ("GET", f"/api/models/{REPO}/tree/SHA")]
    assert ("HEAD", f"/{REPO}/resolve/SHA/model.safetensors") in requests
    assert gets_of_big_file(hub) == [None]
    # hf_hub_download by branch name: the same cached file, after one HEAD.
    hub.requests.clear()
    assert hf_hub_download(REPO, "config.json") == str(Path(folder) / "config.json")
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/main/config.json", None)]


@pytest.mark.parametrize(
    "chunk, retried_with",
    [
        (None, None),  # the real 10 MiB chunks: the 100 kB received are never written, each retry starts at 0
        (10_000, f"bytes={CUT}-"),  # 10 whole chunks written before the cut: each retry asks for the rest
    ],
)
def test_a_cut_transfer_fails_after_retrying_in_call_and_the_next_call_starts_over(
    hub, monkeypatch, tmp_path, chunk, retried_with
):
    sha = hub.add_repo(REPO, FILES)
    if chunk is not None:
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    waits = skip_retry_waits(monkeypatch)
    hub.cut_after = CUT
    with pytest.raises(httpx2.RemoteProtocolError):
        snapshot_download(REPO, allow_patterns=PATTERNS)
    # http_get retried within the call, 5 times without progress (1 s apart), then gave up...
    assert gets_of_big_file(hub) == [None] + [retried_with] * 5
    assert waits == [1] * 5
    # ... and deleted its partial file: nothing is kept to resume from.
    blobs = tmp_path / "hf" / "hub" / "models--acme--tiny-llava" / "blobs"
    assert not [path for path in blobs.iterdir() if path.name.endswith(".incomplete")]
    hub.cut_after = None
    hub.requests.clear()
    assert_snapshot(snapshot_download(REPO, allow_patterns=PATTERNS), sha)
    assert gets_of_big_file(hub) == [None]  # the whole file again, no Range: no resume across calls in 2.4


def test_a_cut_transfer_healed_between_retries_resumes_with_range(hub, monkeypatch):
    sha = hub.add_repo(REPO, FILES)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 10_000)  # so that what came before the cut was written
    waits = skip_retry_waits(monkeypatch, on_wait=lambda: setattr(hub, "cut_after", None))
    hub.cut_after = CUT
    assert_snapshot(snapshot_download(REPO, allow_patterns=PATTERNS), sha)
    assert gets_of_big_file(hub) == [None, f"bytes={CUT}-"]
    assert waits == [1]
    # The resumed GET got only the rest (the client would also cope with a 200 that ignores Range).
    url = f"{hub.url}/{REPO}/resolve/main/model.safetensors"
    rest = httpx.get(url, headers={"Range": f"bytes={CUT}-"}, follow_redirects=True)
    assert (rest.status_code, rest.headers["Content-Range"]) == (206, f"bytes {CUT}-{len(BIG) - 1}/{len(BIG)}")
    assert rest.content == BIG[CUT:]


def test_unknown_repo_revision_and_file(hub):
    hub.add_repo(REPO, FILES)
    with pytest.raises(errors.RepositoryNotFoundError):
        snapshot_download("acme/nope", allow_patterns=PATTERNS)
    with pytest.raises(errors.RepositoryNotFoundError):
        hf_hub_download("acme/nope", "config.json")
    with pytest.raises(errors.RevisionNotFoundError):
        snapshot_download(REPO, revision="v9")
    with pytest.raises(errors.RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    response = httpx.get(f"{hub.url}/api/models/acme/nope/revision/main")
    assert (response.status_code, response.headers["X-Error-Code"]) == (401, "RepoNotFound")
    authorized = httpx.head(f"{hub.url}/acme/nope/resolve/main/config.json", headers={"Authorization": "Bearer x"})
    assert (authorized.status_code, authorized.headers["X-Error-Code"]) == (404, "RepoNotFound")


def test_stopped_server(hub):
    sha = hub.add_repo(REPO, FILES)
    hub.add_repo("acme/other", {"config.json": b"{}"})
    snapshot_download(REPO, allow_patterns=["*.json"])  # cached: the JSON files only
    hub.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(hub.url)
    with pytest.raises(errors.LocalEntryNotFoundError) as caught:
        snapshot_download("acme/other")
    assert type(caught.value) is errors.LocalEntryNotFoundError
    assert isinstance(caught.value.__cause__, httpx2.ConnectError)
    # What is cached is returned; what the cached tree listing says is missing is an IncompleteSnapshotError.
    folder = Path(snapshot_download(REPO, allow_patterns=["*.json"]))
    assert folder.name == sha and (folder / "config.json").read_bytes() == FILES["config.json"]
    with pytest.raises(errors.IncompleteSnapshotError):
        snapshot_download(REPO, allow_patterns=PATTERNS)
    assert hf_hub_download(REPO, "config.json") == str(folder / "config.json")


def test_offline_mode_never_reaches_the_server(hub, monkeypatch):
    sha = hub.add_repo(REPO, FILES)

    def offline(on: bool) -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)  # what huggingface_hub reads, at call time

    offline(True)
    with pytest.raises(errors.LocalEntryNotFoundError) as caught:
        snapshot_download(REPO, allow_patterns=PATTERNS)
    assert isinstance(caught.value.__cause__, errors.OfflineModeIsEnabled)
    assert hub.requests == []
    offline(False)
    folder = snapshot_download(REPO, allow_patterns=PATTERNS)
    offline(True)
    hub.requests.clear()
    assert snapshot_download(REPO, allow_patterns=PATTERNS) == folder
    assert_snapshot(folder, sha)
    assert hf_hub_download(REPO, "config.json") == str(Path(folder) / "config.json")
    assert hub.requests == []


def test_plain_file_range_and_resume(hub):
    data = random.Random(1).randbytes(5000)
    url = hub.add_file("acme/experts/0123abc/expert.pth", data)
    assert url == f"{hub.url}/acme/experts/0123abc/expert.pth"
    whole = httpx.get(url)
    assert (whole.status_code, whole.content) == (200, data)
    part = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert (part.status_code, part.headers["Content-Range"], part.content) == (206, "bytes 10-19/5000", data[10:20])
    tail = httpx.get(url, headers={"Range": "bytes=-100"})
    assert (tail.status_code, tail.content) == (206, data[-100:])
    past = httpx.get(url, headers={"Range": "bytes=5000-"})
    assert (past.status_code, past.headers["Content-Range"]) == (416, "bytes */5000")
    assert httpx.get(f"{hub.url}/acme/experts/0123abc/other.pth").status_code == 404
    # A cut transfer, then a Range request for the rest (what a resuming client does).
    hub.cut_after = 1000
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url) as response:
        for chunk in response.iter_bytes():
            received += chunk
    assert bytes(received) == data[:1000]
    hub.cut_after = None
    rest = httpx.get(url, headers={"Range": f"bytes={len(received)}-"})
    assert rest.status_code == 206 and bytes(received) + rest.content == data
    assert hub.requests[-2:] == [("GET", "/acme/experts/0123abc/expert.pth", None)] + [
        ("GET", "/acme/experts/0123abc/expert.pth", "bytes=1000-")
    ]


def test_nothing_beyond_loopback(hub):
    # The guards are installed (checked first, so that a broken guard never lets a packet out)...
    assert socket.getaddrinfo.__module__ == socket.socket.connect.__module__ == "tests.fake_hub"
    with pytest.raises(AssertionError, match="loopback only"):
        socket.create_connection(("192.0.2.1", 80))
    # ... and huggingface_hub's client goes through them.
    with pytest.raises(AssertionError, match="loopback only"):
        hf_hub_download(REPO, "config.json", endpoint="https://huggingface.co")
