"""Enrolled product profiles: a user's own normal images, remembered next to the model.

`anomaly-assistant enroll NAME --images DIR` turns normal images of one product into a profile: the memory bank
of their patch features (`references.PatchBank`, bounded by greedy coreset from an even subsample of at most
`POOL` times the bound), the domain statistics of those
images (`domain.DomainModel`, when there are enough), and a decision threshold set from normal images alone.
With a profile every query is compared with the bank (`config.ReferenceConfig`), so the verdict's score,
heatmap and boxes reflect that product's normal look.

The knee and the threshold: a share of the images (`THRESHOLD_SHARE`, at least one) is held out and compared, as
queries, with a bank of the others. The (1 - false_alarm_rate) quantile of their largest patch distances is the
profile's own `shift` (`config.ReferenceConfig`: distances up to it are what this product's normal images show;
a large bank's normal distances are smaller than a single reference's). The threshold then lies just above the
(1 - false_alarm_rate) quantile of their verdict scores (an observed score, numpy's "higher"), so about that share
of normal images is flagged. With fewer than 1/false_alarm_rate held-out images that quantile is their highest
score, so enrol more images for a low rate.
The bank that is saved then holds every image; held-out images scored against it would score lower, so the
measured rate errs on the safe side.

A profile is a folder `MODEL/profiles/NAME/` (`profile.json`, `bank.safetensors`, optionally
`domain.safetensors`) and records the model's fingerprint (`image_side_fingerprint`): a profile made with
another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .domain import MIN_IMAGES, DomainError, DomainModel, image_features
from .errors import AssistantError
from .files import PARTIAL_SUFFIX, partial_dir, publish_dir
from .image_io import load_image
from .references import PatchBank

if TYPE_CHECKING:
    from .engine import LocalEngine

PROFILES_DIR = "profiles"
PROFILE_FILE = "profile.json"
BANK_FILE = "bank.safetensors"
FORMAT_VERSION = 1
THRESHOLD_SHARE = 0.2
DEFAULT_FALSE_ALARM_RATE = 0.05
BATCH = 8  # images per vision call while enrolling
POOL = 8  # the coreset chooses from at most POOL x max_patches rows per scale (an even subsample beyond)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ProfileError(AssistantError, ValueError):
    """A profile that does not exist, is damaged, or was made with another model or other settings."""


def image_side_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of what a profile depends on: the image side's weights (names, shapes and an even sample of
    every tensor's values) and the settings its bank, knee and threshold were made under (the expert's feature
    levels, the vision layer, the `reference` and `decision` sections, fit descriptions and the reference prompt
    layout aside: that reaches only the language model).

    The values are rounded to bfloat16 first, so one model gives one fingerprint in whatever dtype it runs: a
    profile enrolled on a CPU in float32 is accepted by the same checkpoint on a GPU or a server in bfloat16."""
    from .vision import IMAGE_MODULES

    config = model.config
    settings = {
        "feature_layers": config.expert.feature_layers,
        "vision_feature_layer": config.vision_feature_layer,
        "reference": config.reference.model_dump(exclude={"fitted_on", "max_patches", "prompt"}),  # prompt: LLM only
        "decision": config.decision.model_dump(exclude={"fitted_on", "threshold"}),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        name = name.removeprefix("model.")  # the full model's prefix; the server's image side has none
        if name.split(".")[0] not in IMAGE_MODULES:
            continue
        values = tensor.detach().flatten()
        values = values[:: max(1, values.numel() // 4096)].to(torch.bfloat16).float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def check_one_source(references: Sequence[object], profile: object | None) -> None:
    """Normal references come from reference images or from a profile, never both (every engine and the server)."""
    if profile is not None and references:
        raise ProfileError("give normal reference images or a profile, not both")


def describe_profiles(model: str | Path) -> list[tuple[str, str]]:
    """(name, description) of each of the model's profiles; a damaged one says why (the CLI's and the server's
    listing)."""
    described = []
    for name in profile_names(model):
        try:
            described.append((name, Profile.load(model, name).describe()))
        except ProfileError as error:
            described.append((name, f"{name}: unusable ({error})"))
    return described


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ProfileError(
            f"profile name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return name


@dataclass
class Profile:
    """One product's normal look for one model."""

    name: str
    bank: PatchBank
    threshold: float  # the verdict is anomalous when its score >= this (set for `false_alarm_rate`)
    false_alarm_rate: float
    fingerprint: str  # `image_side_fingerprint` of the model that made it
    num_images: int
    num_threshold_images: int
    source: str
    created: str
    domain: DomainModel | None = None
    # One identity per profile object (never saved): what caches of its analyses are keyed by.
    uid: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    def describe(self) -> str:
        domain = self.domain.describe() if self.domain else "no domain statistics (too few images)"
        return (
            f"{self.name}: {self.num_images} normal images ({self.source}), {len(self.bank)} patches, knee "
            f"{self.bank.shift if self.bank.shift is not None else float('nan'):.3f}, threshold "
            f"{self.threshold:.3f} for {self.false_alarm_rate:.0%} false alarms (set on {self.num_threshold_images} "
            f"held-out images); domain: {domain}"
        )

    def save(self, model: str | Path) -> Path:
        """Write `model/profiles/NAME/` as a whole: into a partial folder, then renamed into place (a kill, or a
        reader during `enroll --replace`, sees the old profile or the new one, never a mix)."""
        folder = Path(model) / PROFILES_DIR / check_name(self.name)
        partial = partial_dir(folder)
        shutil.rmtree(partial, ignore_errors=True)  # a killed earlier save
        partial.mkdir(parents=True)
        save_file({k: v.half().cpu() for k, v in self.bank.tensors().items()}, str(partial / BANK_FILE))
        if self.domain is not None:
            self.domain.save(partial)
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("bank", "domain", "uid")}
        record["shift"] = self.bank.shift
        text = json.dumps({"format": FORMAT_VERSION, **record}, indent=1) + "\n"
        (partial / PROFILE_FILE).write_text(text, encoding="utf-8")
        return publish_dir(partial, folder)

    @classmethod
    def load(cls, model: str | Path, name: str, fingerprint: str | None = None, feature_dim: int | None = None):
        """The profile `name` of `model`; `fingerprint` refuses one made with another model."""
        folder = Path(model) / PROFILES_DIR / check_name(name)
        if not (folder / PROFILE_FILE).is_file():
            known = profile_names(model)
            raise ProfileError(
                f"no profile {name!r} for {model} (known: {', '.join(known) if known else 'none'}); "
                f"make one with `anomaly-assistant enroll {name} --images DIR`"
            )
        try:
            record = json.loads((folder / PROFILE_FILE).read_text(encoding="utf-8"))
            if record.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {record.get('format')!r}, this version reads {FORMAT_VERSION}")
            tensors = load_file(str(folder / BANK_FILE))
            bank = PatchBank(tensors["overview"].float(), tensors["tiles"].float(), record["shift"])
            stored = {k: record[k] for k in cls.__dataclass_fields__ if k not in ("bank", "domain", "uid")}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            raise ProfileError(f"{folder}: damaged profile ({type(error).__name__}: {error}); enrol it again") from None
        if fingerprint is not None and stored["fingerprint"] != fingerprint:
            raise ProfileError(
                f"profile {name!r} was made with another model or other settings (fingerprint "
                f"{stored['fingerprint']}, this model {fingerprint}); enrol it again with this model"
            )
        try:
            domain = DomainModel.load(folder, feature_dim)
        except DomainError as error:
            raise ProfileError(str(error)) from None
        return cls(bank=bank, domain=domain, **stored)


def profile_names(model: str | Path) -> list[str]:
    """The model's finished profiles (folders being written or replaced are not profiles)."""
    root = Path(model) / PROFILES_DIR
    if not root.is_dir():
        return []
    names = (p.parent.name for p in root.glob(f"*/{PROFILE_FILE}"))
    return sorted(n for n in names if not n.endswith((PARTIAL_SUFFIX, ".previous")))


def normal_bank(engine: LocalEngine, paths: Sequence[Path], description: str) -> PatchBank:
    """The coreset-bounded memory bank of normal images (batches of `BATCH`, bounded as it grows)."""
    limit = engine.model.config.reference.max_patches
    bank: PatchBank | None = None
    for start in tqdm(range(0, len(paths), BATCH), desc=description, unit="batch", disable=len(paths) <= BATCH):
        images = [load_image(path) for path in paths[start : start + BATCH]]
        batch = engine.normal_patches(images)
        bank = batch if bank is None else PatchBank.merged([bank, batch])
        if max(bank.overview.shape[0], bank.tiles.shape[0]) > POOL * limit:  # memory stays bounded
            bank = bank.subsampled(POOL * limit // 2)
    return bank.coreset(limit)


def enroll(
    engine: LocalEngine,
    name: str,
    paths: Sequence[Path],
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    source: str = "",
) -> Profile:
    """A profile of normal images (see the module docstring for how the threshold is set)."""
    from .engine import yes_probability

    check_name(name)
    if not 0.0 < false_alarm_rate < 1.0:
        raise ProfileError(f"false alarm rate must be in (0, 1), got {false_alarm_rate}")
    if len(paths) < 2:
        raise ProfileError(
            f"a profile needs at least 2 normal images (one for the bank, one for the threshold), got {len(paths)}"
        )
    shuffled = list(paths)
    random.Random(0).shuffle(shuffled)
    held = max(1, round(THRESHOLD_SHARE * len(shuffled)))
    threshold_paths, bank_paths = shuffled[:held], shuffled[held:]
    fingerprint = image_side_fingerprint(engine.model)
    common = {"name": name, "false_alarm_rate": false_alarm_rate, "fingerprint": fingerprint, "source": source}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    held_out = [load_image(path) for path in threshold_paths]
    bank = normal_bank(engine, bank_paths, "memory bank (threshold)")

    def trial(shift: float | None) -> Profile:
        kept = PatchBank(bank.overview, bank.tiles, shift)
        return Profile(
            bank=kept, threshold=1.0, num_images=len(bank_paths), num_threshold_images=0, created=created, **common
        )

    unset = trial(None)
    distances = [float(engine.encode([image], unset).analysis.reference.image_distances[0]) for image in held_out]
    knee = float(np.quantile(distances, 1.0 - false_alarm_rate, method="higher"))
    with_knee = trial(knee)
    scores = []
    for image in tqdm(held_out, desc="threshold", unit="image", disable=len(held_out) < 2):
        scores.append(engine.decide(image, [], yes_probability(engine, image), with_knee).score)
    # "higher": an observed score; just above it, so the held-out image that sets it is itself called normal
    threshold = min(1.0, float(np.nextafter(np.quantile(scores, 1.0 - false_alarm_rate, method="higher"), 2.0)))
    domain = None
    if len(bank_paths) >= MIN_IMAGES:
        fit = image_features(engine, bank_paths, "domain features (fit)")
        held_features = image_features(engine, held_out, "domain features (threshold)")
        domain = DomainModel.fit(fit, held_features, source=source)
    final = normal_bank(engine, shuffled, "memory bank")
    return Profile(
        bank=PatchBank(final.overview, final.tiles, knee),
        threshold=threshold,
        num_images=len(shuffled),
        num_threshold_images=held,
        created=created,
        domain=domain,
        **common,
    )
