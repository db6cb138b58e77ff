"""Few-shot: the query's patches against normal patches, from reference images or an enrolled profile.

PatchCore-style nearest neighbours on the features the expert reads (the vision tower's `expert.feature_layers`):
each level is averaged over a `neighbourhood` x `neighbourhood` window of the patch grid (local context, so a
patch is matched with its surroundings), L2-normalised, and the levels are concatenated and scaled by
1/sqrt(levels), so one dot product is the mean cosine over levels. A query patch's distance is 1 minus its best
cosine among the normal patches *of the same scale*: AnyRes gives every image a whole-image crop and tiles, and
a tile patch covers a few times less fabric than a whole-image patch, so whole-image crops are compared with
whole-image crops and tiles with tiles (with the whole-image crops when the normals had no tiles).

`PatchBank` is the memory bank: bounded (`ReferenceConfig.max_patches` per scale) by a strided subsample for a
request's reference images (fast, deterministic) and by PatchCore's greedy coreset for an enrolled profile.
`fuse` is the one rule that turns distances into evidence for the expert (`config.ReferenceConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ReferenceConfig

CHUNK = 4096  # bank rows per matmul: the similarity block of a 10-crop 729-patch query stays ~120 MB


def patch_features(levels: list[torch.Tensor], neighbourhood: int) -> torch.Tensor:
    """[C, N, D] per level -> [C, N, levels * D]: locally averaged, unit-norm per level, unit-norm overall."""
    crops, patches, _ = levels[0].shape
    side = int(patches**0.5)
    parts = []
    for features in levels:
        grid = features.float().transpose(1, 2).reshape(crops, -1, side, side)
        if neighbourhood > 1:
            grid = F.avg_pool2d(grid, neighbourhood, 1, neighbourhood // 2, count_include_pad=False)
        parts.append(F.normalize(grid.flatten(2).transpose(1, 2), dim=-1))
    return torch.cat(parts, dim=-1) / len(levels) ** 0.5


def _is_overview(crops_per_image: list[int], device: torch.device) -> torch.Tensor:
    """[C] True for each image's whole-image crop (crop 0), False for its tiles."""
    flags = [index == 0 for count in crops_per_image for index in range(count)]
    return torch.tensor(flags, dtype=torch.bool, device=device)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """[P, F] unit rows -> [P]: 1 - the best cosine with any bank row (in chunks, for bounded memory)."""
    best = torch.full((queries.shape[0],), -1.0, device=queries.device)
    for start in range(0, bank.shape[0], CHUNK):
        block = bank[start : start + CHUNK].to(queries)
        best = torch.maximum(best, (queries @ block.T).amax(dim=1))
    return 1.0 - best


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of `size` rows that cover `features` (PatchCore's greedy k-center selection on a random projection).

    Each step adds the row farthest from everything chosen so far, so rare normal patches (edges, prints)
    survive the subsampling that a random sample would thin out. One matrix-vector product per step.
    """
    if size >= features.shape[0]:
        return torch.arange(features.shape[0], device=features.device)
    generator = torch.Generator().manual_seed(seed)
    features = features.float()
    if features.shape[1] > projection_dim:
        projection = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        features = features @ projection.to(features)
    norms = features.square().sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(features.shape[0], (1,), generator=generator))
    distance = norms - 2 * features @ features[chosen[0]] + norms[chosen[0]]
    for step in range(1, size):
        index = int(distance.argmax())
        chosen[step] = index
        torch.minimum(distance, norms - 2 * features @ features[index] + norms[index], out=distance)
    return chosen.to(features.device)


@dataclass
class PatchBank:
    """Normal patch features (`patch_features` rows) per scale: whole-image crops and AnyRes tiles."""

    overview: torch.Tensor  # [M, F]
    tiles: torch.Tensor  # [M', F]; empty when the normal images had no tiles
    # The distance up to which this bank's own normal images reach (an enrolled profile measures it on held-out
    # normals); None: the checkpoint's `reference.shift`, fitted for a few references.
    shift: float | None = None

    @classmethod
    def from_features(cls, levels: list[torch.Tensor], crops_per_image: list[int], neighbourhood: int) -> PatchBank:
        features = patch_features(levels, neighbourhood)
        overview = _is_overview(crops_per_image, features.device)
        return cls(features[overview].flatten(0, 1), features[~overview].flatten(0, 1))

    @classmethod
    def merged(cls, banks: list[PatchBank]) -> PatchBank:
        return cls(torch.cat([b.overview for b in banks]), torch.cat([b.tiles for b in banks]))

    def __len__(self) -> int:
        return self.overview.shape[0] + self.tiles.shape[0]

    def subsampled(self, max_patches: int) -> PatchBank:
        """At most `max_patches` rows per scale, evenly strided (a request's references: fast, deterministic)."""

        def stride(rows: torch.Tensor) -> torch.Tensor:
            if rows.shape[0] <= max_patches:
                return rows
            return rows[torch.linspace(0, rows.shape[0] - 1, max_patches).round().long()]

        return PatchBank(stride(self.overview), stride(self.tiles), self.shift)

    def coreset(self, max_patches: int, seed: int = 0) -> PatchBank:
        """At most `max_patches` rows per scale, chosen by `greedy_coreset` (an enrolled profile)."""
        return PatchBank(
            self.overview[greedy_coreset(self.overview, max_patches, seed=seed)],
            self.tiles[greedy_coreset(self.tiles, max_patches, seed=seed)] if len(self.tiles) else self.tiles,
            self.shift,
        )

    def distances(self, levels: list[torch.Tensor], crops_per_image: list[int], neighbourhood: int) -> torch.Tensor:
        """[C, side, side]: each query patch's nearest-neighbour distance to the normal patches of its scale."""
        features = patch_features(levels, neighbourhood)
        crops, patches, _ = features.shape
        overview = _is_overview(crops_per_image, features.device)
        distance = torch.empty(crops, patches, device=features.device)
        distance[overview] = nearest_distance(features[overview].flatten(0, 1), self.overview).view(-1, patches)
        if (~overview).any():
            tiles = self.tiles if len(self.tiles) else self.overview
            distance[~overview] = nearest_distance(features[~overview].flatten(0, 1), tiles).view(-1, patches)
        side = int(patches**0.5)
        return distance.view(crops, side, side)

    def to(self, device: torch.device | str) -> PatchBank:
        return PatchBank(self.overview.to(device), self.tiles.to(device), self.shift)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"overview": self.overview.contiguous(), "tiles": self.tiles.contiguous()}


@dataclass
class ReferenceEvidence:
    """What the normal patches say about each query crop and image (kept with the analysis, for the Verdict)."""

    distances: torch.Tensor  # [Cq, side, side] nearest-neighbour distance of every patch
    image_distances: torch.Tensor  # [Q] each query's largest patch distance (PatchCore's image score)


def image_distances(distances: torch.Tensor, crops_per_image: list[int]) -> torch.Tensor:
    return torch.stack([d.amax() for d in torch.split(distances, crops_per_image)])


def fuse(
    maps: torch.Tensor,
    logits: torch.Tensor,
    evidence: ReferenceEvidence,
    crops_per_image: list[int],
    config: ReferenceConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, logits) with the references' evidence in (`config.ReferenceConfig`):

        image logit = expert logit + weight * max(0, image distance - shift)
        patch map   = (1 - map_weight) * LTFM map + map_weight * sigmoid(image logit) * distance / image distance

    A patch farther from every normal patch than normal images' patches are (`shift`) is evidence of an anomaly;
    a query close to the normal patches is no evidence of normality (a global defect, e.g. a changed weave or
    tone, keeps its patches near normal ones), so the image logit only rises. Each patch's reference map is the
    image probability shared out by the patch's distance, so the farthest patch gets it all and the map keeps
    the distances' contrast (a sigmoid per patch would saturate a whole tile whose late-layer features all shift
    a little around a defect).
    """
    excess = (evidence.image_distances.to(logits.device) - config.shift).clamp(min=0)
    fused_logits = logits.float() + config.weight * excess
    crops = torch.tensor(crops_per_image, device=maps.device)
    probability = torch.repeat_interleave(torch.sigmoid(fused_logits), crops)[:, None, None]
    farthest = torch.repeat_interleave(evidence.image_distances.clamp(min=1e-6), crops)[:, None, None]
    reference_maps = probability * (evidence.distances / farthest).clamp(0, 1)
    fused_maps = (1 - config.map_weight) * maps.float() + config.map_weight * reference_maps
    return fused_maps.to(maps.dtype), fused_logits
