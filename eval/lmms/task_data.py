"""What the lmms-eval tasks share: a task whose rows come from an official file on disk.

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


class LocalFileTask(ConfigurableTask):
    """A YAML task whose test split is `rows(file, dataset_kwargs)`, the file named by `$DATA_ENV`."""

    DATA_ENV: str  # the variable holding the official file's path
    DATA_WHAT: str  # what that file is, for the error naming it

    def __init__(self, config: dict) -> None:
        # lmms-eval hands a `class:` task its whole YAML, but its TaskConfig has no "class" field.
        super().__init__(config={key: value for key, value in config.items() if key != "class"})

    def rows(self, path: Path, options: dict) -> list[dict]:
        raise NotImplementedError

    def data_file(self) -> Path:
        value = os.environ.get(self.DATA_ENV)
        if not value:
            raise DataError(f"set ${self.DATA_ENV} to {self.DATA_WHAT} (the lmms-eval task reads the official file)")
        path = Path(value).expanduser().resolve()
        if not path.is_file():
            raise DataError(f"${self.DATA_ENV}={value}: no such file ({self.DATA_WHAT})")
        return path

    def download(self, dataset_kwargs: dict | None = None) -> None:
        path, options = self.data_file(), dict(dataset_kwargs or {})
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(self.rows(path, options))})
        self.dataset_no_image = self.dataset
        # The file is part of the task's configuration, so lmms-eval's response cache (keyed by the task's
        # dumped config) never serves answers about another file's questions.
        stat = path.stat()
        self.config.dataset_kwargs = {**options, "source": f"{path} ({stat.st_size} bytes, {stat.st_mtime_ns} ns)"}

    def process_results(self, doc: dict, results: list, full_docs=None) -> dict:
        """The answers as generated: the base class strips them, `eval` scores them unstripped (the official
        parse's closest-option fallback depends on the whole text)."""
        return self.config.process_results(doc, results)
