"""What the lmms-eval tasks share: where the official files are, and a task whose docs come from them.

lmms-eval reads a task's rows with `datasets.load_dataset`; MMAD's and VisA-D&R's official files are a JSON object
and list with image paths, read by our own loaders (`eval.mmad_data`, `eval.visa_dr_data`). So each task is a
`LocalFileTask` (the YAML's `class:`) that builds its rows from the file an environment variable names, with the
same items, order and settings as `anomaly-assistant eval`; the YAML's `dataset_kwargs` hold those settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from lmms_eval.api.task import ConfigurableTask

from data.errors import DataError


def data_file(variable: str, what: str) -> Path:
    """The official file named by `variable`, or a one-line error saying how to give it."""
    value = os.environ.get(variable)
    if not value:
        raise DataError(f"set ${variable} to {what} (the lmms-eval task reads the official file from disk)")
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"${variable}={value}: no such file ({what})")
    return path


class LocalFileTask(ConfigurableTask):
    """A YAML task whose test split is `rows(dataset_kwargs)`: official files on disk instead of the Hub."""

    def __init__(self, config: dict) -> None:
        super().__init__(config={key: value for key, value in config.items() if key != "class"})

    def rows(self, options: dict) -> list[dict]:
        raise NotImplementedError

    def download(self, dataset_kwargs: dict | None = None) -> None:
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(self.rows(dict(dataset_kwargs or {})))})
        self.dataset_no_image = self.dataset
