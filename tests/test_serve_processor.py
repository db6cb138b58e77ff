"""vLLM's multimodal processor against our processor and `layout.py`, without starting an engine.

vLLM is only importable with the serving interpreter, so `serve_processor_checks.py` runs there and
reports what vLLM produced; the assertions (and the expected layouts) live here.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from assistant.factory import save_assistant, tiny_assistant
from assistant.layout import image_layout
from tests.helpers import ROOT

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", params=[True, False], ids=["roi", "no_roi"])
def report(request, serving_python, tmp_path_factory):
    model, processor = tiny_assistant(roi=request.param)
    path = save_assistant(model, processor, tmp_path_factory.mktemp("processor") / "tiny")
    result = subprocess.run(
        [serving_python, str(ROOT / "tests" / "serve_processor_checks.py"), str(path)],
        cwd=ROOT, capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), model.config


def test_expanded_prompts_equal_the_transformers_processor(report):
    data, _ = report
    for case in data["cases"] + data["roles"]:
        assert case["vllm_ids"] == case["processor_ids"], case["sizes"]


def test_embedding_positions_follow_the_layout(report):
    data, config = report
    for case in data["cases"]:
        sizes = [tuple(size) for size in case["sizes"]]
        expected = [
            image_layout(size, config, is_query=i == len(sizes) - 1).num_embeddings for i, size in enumerate(sizes)
        ]
        assert case["embeds"] == expected, sizes
        assert max(expected) <= data["max_tokens_per_image"]


def test_an_image_seen_as_query_and_as_reference_has_two_identities(report):
    data, config = report
    as_query, then = data["roles"]
    assert as_query["hashes"][0] != then["hashes"][0]
    assert then["embeds"][0] == image_layout((64, 96), config, is_query=False).num_embeddings


def test_images_over_the_pixel_limit_are_refused_with_the_reason(report):
    data, _ = report
    assert data["too_large"] == "413 image 1: 70x70 pixels is more than the limit"
