"""The expert's analysis in the API-server process, from the image side of the checkpoint only.

vLLM runs the model in its engine processes and returns text, so the verdict's score, heatmap and boxes
are computed here by the same `encode_images` code from the vision tower, projector, expert and the
three adverb rows of the LLM's token embeddings (no LLM weights: for SigLIP-so400m about 0.9 GB in
bf16). ROI tokens only feed the LLM, so this copy runs with them off and skips their second vision pass.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import AssistantConfig
from ..engine import LocalEngine
from ..processing import AssistantProcessor
from ..vision import IMAGE_MODULES, ImageEncoder

TOKEN_EMBEDDINGS = "model.language_model.embed_tokens.weight"


def tensor_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (single-file or sharded checkpoints)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


def image_side_state(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The image modules' tensors, named as in `ImageEncoder`."""
    prefixes = tuple(f"model.{name}" for name in IMAGE_MODULES)
    by_file = defaultdict(list)
    for name, file in files.items():
        if name.startswith(prefixes):
            by_file[file].append(name)
    state = {}
    for file, names in by_file.items():
        with safe_open(file, "pt") as handle:
            state.update({name.removeprefix("model."): handle.get_tensor(name) for name in names})
    return state


def token_rows(files: dict[str, Path], token_ids: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Embedding lookup restricted to `token_ids`, read row by row from the LLM's embedding table."""
    ids = sorted(set(token_ids))
    with safe_open(files[TOKEN_EMBEDDINGS], "pt") as handle:
        table = handle.get_slice(TOKEN_EMBEDDINGS)
        rows = torch.cat([table[token : token + 1] for token in ids])
    position = {token: index for index, token in enumerate(ids)}

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        index = torch.tensor([position[t] for t in tokens.flatten().tolist()])
        return rows[index].view(*tokens.shape, -1).to(tokens.device)

    return embed


def analysis_engine(path: str | Path, dtype: torch.dtype, device: str) -> LocalEngine:
    """A `LocalEngine` over the image side only: its `analyze` is the in-process engine's, unchanged."""
    path = Path(path)
    config = AssistantConfig.from_pretrained(path)
    config.roi["enabled"] = False
    files = tensor_files(path)
    encoder = ImageEncoder(
        config, token_embeddings=token_rows(files, [t for ids in config.adverb_token_ids for t in ids])
    )
    encoder.load_state_dict(image_side_state(files), strict=True)
    return LocalEngine(encoder.to(device, dtype), AssistantProcessor.from_pretrained(path, config=config))
