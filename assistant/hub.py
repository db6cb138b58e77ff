"""Getting real weights: a `--model` that names a preset or a Hugging Face Hub id, and `anomaly-assistant pull`.

A pulled preset needs two downloads, each resumable, with a progress bar, into a cache that survives runs:
the llava-hf checkpoint through huggingface_hub (its own cache, `HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`)
and the official expert file from its public URL (kept under the assistant's cache, checked against the git blob
id of its repository's tree). They are converted once (`convert.from_llava_onevision`) into
`$ANOMALY_ASSISTANT_CACHE/models/NAME` (default `$HF_HOME/anomaly-assistant`), written as a partial folder and
renamed into place, so a kill never leaves a half-converted model that looks finished. Later runs read the
converted folder and contact nothing. When a download cannot happen (offline, Hub unreachable, file gone) the
error says in one line what to download, from where, and where to put it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import AssistantError
from .files import cache_dir, partial_dir, publish_dir, write_text_atomic
from .presets import ExpertDownload, Preset, get_preset, list_models

PULLED_FILE = "pulled.json"  # in a converted folder: what it was made from (repo commit, expert blob)
# What the assistant reads of a llava-hf repository: weights, configs, tokenizer, chat template.
LLAVA_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHUNK = 1 << 20


class DownloadError(AssistantError, RuntimeError):
    """Weights that could not be fetched or verified; the message says what to get, from where, and where to."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_hub_id(spec: str) -> bool:
    """`owner/name` that is not a local path (a folder of that name wins)."""
    return bool(HUB_ID.match(spec)) and not Path(spec).exists()


# -- the official expert file ----------------------------------------------------------------------------------


def git_blob_id(path: Path) -> str:
    """The id git gives a file's content: sha1 of `blob <size>\\0` + the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def expert_path(expert: ExpertDownload) -> Path:
    return cache_dir() / "experts" / expert.git_blob / expert.filename


def download_expert(expert: ExpertDownload, timeout: float = 60.0) -> Path:
    """The verified expert file, downloaded (or resumed from a `.part` file) unless already cached."""
    destination = expert_path(expert)
    if destination.is_file():
        return destination
    url = expert.url
    by_hand = f"download {expert.page} and put it at {destination}"
    if offline():
        raise DownloadError(f"{expert.filename} is not cached and HF_HUB_OFFLINE is set: {by_hand}")
    partial = destination.with_name(destination.name + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(url, partial, timeout)
    except DownloadError as error:
        raise DownloadError(f"{error}; run again to resume, or {by_hand}") from None
    found = git_blob_id(partial)
    if found != expert.git_blob:
        partial.unlink()
        raise DownloadError(
            f"{url}: the file's git blob id is {found}, the repository's tree says {expert.git_blob} (a changed or "
            f"corrupt file; it was not kept); {by_hand} only if you trust it"
        )
    os.replace(partial, destination)
    return destination


def _fetch(url: str, partial: Path, timeout: float) -> None:
    """Stream `url` into `partial`, continuing from its current size with an HTTP Range request."""
    import httpx
    from tqdm.auto import tqdm

    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as response:
            if response.status_code == 416 and offset:  # nothing left to send: the part is whole (the digest checks)
                return
            if response.status_code >= 400:
                raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason_phrase}")
            if response.status_code != 206:  # the server sent the whole file: start again
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            with partial.open("ab" if offset else "wb") as handle, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=partial.name.removesuffix(".part")
            ) as bar:
                for chunk in response.iter_bytes():  # as received: a cut keeps every byte that came
                    handle.write(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as error:
        raise DownloadError(f"{url}: {type(error).__name__}: {error or 'connection failed'}") from None


# -- llava-hf checkpoints through huggingface_hub ---------------------------------------------------------------


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a Hub repository's files the assistant reads (downloaded or resumed if needed)."""
    import httpx2  # huggingface_hub's HTTP client
    import huggingface_hub
    from huggingface_hub import errors

    by_hand = (
        f"download it where the Hub is reachable (`hf download {repo_id}`) and copy the Hugging Face cache "
        f"({huggingface_hub.constants.HF_HUB_CACHE}) here, or pass --model LOCAL_FOLDER"
    )
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=LLAVA_FILES))
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as error:
        kind = "revision" if isinstance(error, errors.RevisionNotFoundError) else "repository"
        raise DownloadError(
            f"{repo_id}: no such {kind} on {huggingface_hub.constants.ENDPOINT} (a private or gated one needs "
            "HF_TOKEN)"
        ) from None
    except errors.LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if offline() else f"{huggingface_hub.constants.ENDPOINT} cannot be reached"
        raise DownloadError(f"{repo_id} is not in the Hugging Face cache and {reason}: {by_hand}") from None
    except (errors.HfHubHTTPError, httpx2.HTTPError, OSError) as error:  # a cut transfer, a server error, a full disk
        first_line = str(error).splitlines()[0] if str(error) else "no message"
        raise DownloadError(
            f"{repo_id}: download failed ({type(error).__name__}: {first_line}); run again (the files that "
            f"finished are kept), or {by_hand}"
        ) from None


def llava_source(spec: str) -> Path:
    """`convert --llava`: a local folder, else a Hub id's snapshot."""
    if Path(spec).exists() or not is_hub_id(spec):
        return Path(spec)
    return snapshot(spec)


def expert_source(spec: str | None) -> Path | None:
    """`convert --expert`: a local file, else a registered official expert named by file name or URL."""
    if spec is None or Path(spec).exists():
        return None if spec is None else Path(spec)
    known = [expert for expert in (get_preset(name).expert_file for name in list_models()) if expert is not None]
    for expert in known:
        if spec in (expert.filename, expert.url, expert.page):
            return download_expert(expert)
    names = ", ".join(expert.filename for expert in known)
    raise DownloadError(f"{spec}: no such file, and not an official expert ({names}) or its URL")


# -- presets and Hub ids as models ------------------------------------------------------------------------------


def model_folder(name: str) -> Path:
    return cache_dir() / "models" / name


def pull(name: str, force: bool = False) -> Path:
    """The folder of preset `name`, made if needed: bundled as shipped, random ones built, pulled ones fetched
    and converted. A converted folder is reused unless `force`."""
    preset = get_preset(name)
    if preset.kind == "bundled":
        from .defaults import default_model_path

        folder = default_model_path()
        if folder is None:
            raise DownloadError("this installation has no bundled demo model: build it with `anomaly-assistant "
                                "train demo`")
        return folder
    folder = model_folder(name)
    if (folder / "config.json").is_file() and not force:
        return folder
    if preset.kind == "random":
        return _publish(folder, lambda out: _build_random(preset, out), {"preset": name})
    llava = snapshot(preset.llava_repo)
    expert = download_expert(preset.expert_file)
    pulled = {
        "preset": name,
        "llava": preset.llava_repo,
        "llava_commit": llava.name,  # the snapshot folder is named by the commit
        "expert_url": preset.expert_file.url,
        "expert_git_blob": preset.expert_file.git_blob,
    }
    return _publish(folder, lambda out: _convert(llava, expert, out, preset.llava_repo, preset), pulled)


def from_hub(repo_id: str) -> Path:
    """A Hub id as a model folder: an assistant checkpoint as it is, a llava-hf one converted once (with the
    expert of the preset built on it, else a random one, which its card says)."""
    presets = [get_preset(name) for name in list_models()]
    for preset in presets:
        if preset.llava_repo == repo_id:
            return pull(preset.name)
    folder = snapshot(repo_id)
    model_type = _model_type(folder)
    if model_type == "anomaly_assistant":
        return folder
    if model_type != "llava_onevision":
        kind = model_type or "unknown"
        raise DownloadError(f"{repo_id}: a {kind} model, not an assistant or a llava-hf LLaVA-OneVision one")
    target = model_folder("hub--" + repo_id.replace("/", "--") + "--" + folder.name[:12])
    if (target / "config.json").is_file():
        return target
    pulled = {"llava": repo_id, "llava_commit": folder.name, "expert_url": None}
    return _publish(target, lambda out: _convert(folder, None, out, repo_id), pulled)


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _publish(folder: Path, build, pulled: dict) -> Path:
    """Build into a partial folder, record what it came from, and rename it into place."""
    partial = partial_dir(folder)
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    write_text_atomic(partial / PULLED_FILE, json.dumps(pulled, indent=2) + "\n")
    return publish_dir(partial, folder)


def _build_random(preset: Preset, out: Path) -> None:
    from .card import untrained_card
    from .config import token_part_fields
    from .factory import create_assistant, save_assistant, tiny_tokenizer

    model, processor = create_assistant(
        dict(preset.vision),
        dict(preset.text),
        tiny_tokenizer(),
        **token_part_fields(preset.token_parts, preset.expert, preset.roi),
        llm_token_parts=list(preset.token_parts),
    )
    card = untrained_card(preset.name, f"{preset.summary}. Random weights: every answer and score is noise.")
    save_assistant(model, processor, out, card=card)


def _convert(llava: Path, expert: Path | None, out: Path, source: str, preset: Preset | None = None) -> None:
    """Convert with a preset's token parts and expert / ROI settings (a bare Hub id: the llava-hf defaults)."""
    from .convert import converted_card, from_llava_onevision
    from .factory import save_assistant

    if preset is None:
        model, processor = from_llava_onevision(llava, expert)
    else:
        model, processor = from_llava_onevision(
            llava, expert, token_parts=preset.token_parts, expert=dict(preset.expert), roi=dict(preset.roi)
        )
    save_assistant(model, processor, out, card=converted_card(source, expert))
