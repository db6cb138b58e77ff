"""Dataset mixtures in the datasets.yaml format of LLaVA-NeXT / Anomaly-OV.

    datasets:
      - json_path: mvtec/mvtec_zero_shot.json
        sampling_strategy: all            # all | first:N | end:N | random:N | random:N%
        image_folder: mvtec               # optional; default: the image root given to the loader
      - json_path: llava_ov/sharegpt4v.json
        sampling_strategy: random:10%

Relative paths are resolved against the YAML file's folder, so a mixture file travels with its data.
Random sampling is seeded per entry, so the same seed always selects the same records.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import DataError
from .instruct import InstructSample, load_instruct_json

STRATEGY = re.compile(r"^(all)$|^(first|end|random):(\d+)(%?)$")


class MixtureEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    json_path: str
    sampling_strategy: str = "all"
    image_folder: str | None = None

    @field_validator("sampling_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if not STRATEGY.match(value.strip()):
            raise ValueError(f"unknown sampling_strategy {value!r}: use all, first:N, end:N, random:N or random:N%")
        return value.strip()


class Mixture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[MixtureEntry]


def sample(items: list, strategy: str, rng: random.Random) -> list:
    """Apply one sampling strategy; N% rounds up so a non-empty file never contributes nothing."""
    match = STRATEGY.match(strategy)
    if match.group(1):
        return list(items)
    kind, number, percent = match.group(2), int(match.group(3)), match.group(4)
    count = math.ceil(len(items) * number / 100) if percent else min(number, len(items))
    if kind == "first":
        return items[:count]
    if kind == "end":
        return items[len(items) - count :]
    return rng.sample(items, count)


def load_mixture(path: str | Path, image_root: str | Path | None = None, seed: int = 0) -> list[InstructSample]:
    """All entries' samples, each sampled by its strategy, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mixture file not found")
    try:
        mixture = Mixture.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as error:
        raise DataError(f"{path}: not a valid datasets.yaml ({error})") from error
    samples = []
    for index, entry in enumerate(mixture.datasets):
        folder = path.parent / entry.image_folder if entry.image_folder else image_root
        records = load_instruct_json(path.parent / entry.json_path, folder)
        samples += sample(records, entry.sampling_strategy, random.Random(f"{seed}:{index}:{entry.json_path}"))
    return samples
