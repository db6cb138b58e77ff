"""Domain awareness: does an image look like the images this checkpoint was trained on?

An anomaly score means little on an image unlike any the model has seen (a cat photo given to a fabric
model): the expert's "normal" is only defined on its training domain. A checkpoint can therefore carry a
`DomainModel`: a Gaussian over its training images' pooled vision features
(`vision.ImageAnalysis.pooled_features`) with a Ledoit-Wolf shrunk covariance, which stays well conditioned
with fewer images than feature dimensions. A new image's squared Mahalanobis distance to it is compared with
the distances of held-out images of the same domain, never with the fit images' own: those are optimistically
small (the mean and covariance were fitted to them), so an in-sample threshold would flag many ordinary new
images as out of domain.

The model is a few arrays (mean, precision, sorted reference distances, threshold) in `domain.safetensors`
beside the checkpoint's weights; its description (source, counts, feature size, quantile) is in the file's
string metadata.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .errors import AssistantError
from .files import atomic_path
from .image_io import ImageInput, load_image

if TYPE_CHECKING:  # the engine pulls in the whole model stack; this module's check path needs only numpy
    from .engine import ImageAnalyzer

DOMAIN_FILE = "domain.safetensors"
FORMAT_VERSION = "1"
DEFAULT_QUANTILE = 0.99
THRESHOLD_SHARE = 0.2  # of the images held out for the threshold when no validation images are given
SPLIT_SEED = 0  # the same images always give the same split, hence the same file
MIN_IMAGES = 5  # below this a split leaves too few images for either the Gaussian or the threshold
RIDGE = 1e-6  # relative to the mean variance: keeps the precision finite when some feature never varies
TENSORS = ("mean", "precision", "reference_distances", "threshold")


class DomainError(AssistantError, ValueError):
    """A domain model that cannot be fitted, read or applied, with a message meant for the user."""


def _features(values: object, what: str) -> np.ndarray:
    """[N, D] float64 from a numpy array, a (CPU or GPU) torch tensor or nested lists; one row is [1, D]."""
    if hasattr(values, "detach"):  # torch without importing it: a GPU tensor must come to the CPU first
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise DomainError(f"{what}: expected features of shape [N, D], got {array.shape}")
    if not np.isfinite(array).all():
        raise DomainError(f"{what}: features contain NaN or infinite values")
    return array


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances [N] (float64 arithmetic, so a saved float32 model gives the same numbers)."""
    centred = features - mean.astype(np.float64)
    distances = np.einsum("ij,jk,ik->i", centred, precision.astype(np.float64), centred)
    return np.maximum(distances, 0.0)


@dataclass(frozen=True, eq=False)
class DomainModel:
    """A Gaussian over one domain's pooled vision features and the held-out distances that calibrate it.

    `check` gives an empirical p-value (the share of held-out in-domain images at least as far from the mean)
    and the decision `distance <= threshold`, the `quantile` of those held-out distances: about that share of
    new images from the training domain come out in domain.
    """

    mean: np.ndarray  # [D] float32
    precision: np.ndarray  # [D, D] float32, inverse of the shrunk covariance
    reference_distances: np.ndarray  # [R] float64, sorted: squared distances of images not used for the fit
    threshold: float  # squared distance; at most this is in domain
    quantile: float = DEFAULT_QUANTILE
    num_images: int = 0  # images the mean and covariance were fitted on
    source: str = ""  # what the images were, in words (a dataset folder, a glob)

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(
        cls,
        features_fit: np.ndarray,
        features_threshold: np.ndarray | None = None,
        quantile: float = DEFAULT_QUANTILE,
        source: str = "",
    ) -> DomainModel:
        """Fit the Gaussian on `features_fit` [N, D] and take the threshold from `features_threshold` [M, D].

        Without `features_threshold` a seeded 80/20 split of `features_fit` provides it: the threshold must come
        from images the Gaussian has not seen, or it is too tight for new images.
        """
        if not 0.0 < quantile <= 1.0:
            raise DomainError(f"quantile must be in (0, 1], got {quantile}")
        fit = _features(features_fit, "fit images")
        if features_threshold is None:
            if len(fit) < MIN_IMAGES:
                raise DomainError(f"a domain needs at least {MIN_IMAGES} images, got {len(fit)}")
            order = np.random.default_rng(SPLIT_SEED).permutation(len(fit))
            held_out = max(1, round(THRESHOLD_SHARE * len(fit)))
            fit, reference = fit[order[held_out:]], fit[order[:held_out]]
        else:
            reference = _features(features_threshold, "threshold images")
            if reference.shape[1] != fit.shape[1]:
                raise DomainError(f"threshold images have {reference.shape[1]} features, fit images {fit.shape[1]}")
        if len(fit) < 2:
            raise DomainError(f"fitting a domain needs at least 2 images, got {len(fit)}")
        if len(reference) < 1:
            raise DomainError("setting the domain threshold needs at least 1 held-out image")
        from sklearn.covariance import LedoitWolf  # only fitting needs scikit-learn

        estimator = LedoitWolf(store_precision=False).fit(fit)
        covariance = estimator.covariance_
        scale = float(np.trace(covariance)) / covariance.shape[0]
        if not scale > 0.0:
            raise DomainError(f"the {len(fit)} fit images all give the same features: fit on varied images")
        covariance = covariance + RIDGE * scale * np.eye(covariance.shape[0])
        precision = np.linalg.inv(covariance)
        mean = estimator.location_.astype(np.float32)
        precision = ((precision + precision.T) / 2).astype(np.float32)
        distances = np.sort(mahalanobis(reference, mean, precision))
        # "higher": an observed distance, so the image that sets the threshold is itself in domain. With R
        # reference images about k/(R + 1) of new ones fall at or under the k-th: more validation images, closer
        # to `quantile`.
        threshold = float(np.quantile(distances, quantile, method="higher"))
        return cls(mean, precision, distances, threshold, float(quantile), len(fit), source)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances [N] of features [N, D] (or one [D] row)."""
        features = _features(features, "features")
        if features.shape[1] != self.feature_dim:
            raise DomainError(
                f"image features have {features.shape[1]} dimensions, the domain model {self.feature_dim}: "
                "it was fitted with another model"
            )
        return mahalanobis(features, self.mean, self.precision)

    def check_many(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores [N] in [0, 1], in_domain [N] bool): see `check`."""
        distances = self.distances(features)
        reference = self.reference_distances
        at_least_as_far = len(reference) - np.searchsorted(reference, distances, side="left")
        return at_least_as_far / len(reference), distances <= self.threshold

    def check(self, feature: np.ndarray) -> tuple[float, bool]:
        """(score, in_domain) of one image's pooled feature [D].

        `score` is the share of held-out in-domain images at least as far from the domain's mean: 1 = as
        typical as any, 0 = farther than all of them. `in_domain` is `distance <= threshold`.
        """
        feature = _features(feature, "feature")
        if len(feature) != 1:
            raise DomainError(f"check takes one image's feature, got {len(feature)}; use check_many")
        scores, in_domain = self.check_many(feature)
        return float(scores[0]), bool(in_domain[0])

    def describe(self) -> str:
        """One line for `anomaly-assistant info` and `fit-domain`."""
        return (
            f"{self.num_images} images ({self.source or 'source not recorded'}), {self.feature_dim} features; "
            f"in domain up to the {self.quantile:g} quantile of {len(self.reference_distances)} held-out images' "
            "distances"
        )

    # -- beside a checkpoint ------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_VERSION,
            "source": self.source,
            "num_images": str(self.num_images),
            "num_reference": str(len(self.reference_distances)),
            "feature_dim": str(self.feature_dim),
            "quantile": repr(self.quantile),
        }

    def save(self, folder: str | Path) -> Path:
        """Write `folder/domain.safetensors` in one step (a kill leaves the old file or the new one)."""
        path = Path(folder) / DOMAIN_FILE
        tensors = {
            "mean": np.ascontiguousarray(self.mean, dtype=np.float32),
            "precision": np.ascontiguousarray(self.precision, dtype=np.float32),
            "reference_distances": np.ascontiguousarray(self.reference_distances, dtype=np.float64),
            "threshold": np.array([self.threshold], dtype=np.float64),
        }
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, folder: str | Path, feature_dim: int | None = None) -> DomainModel | None:
        """The domain model saved in a checkpoint folder; None when it has none.

        `feature_dim` (the vision tower's hidden size) refuses a file fitted with another model. A damaged or
        inconsistent file is a `DomainError`, never a silently wrong check.
        """
        path = Path(folder) / DOMAIN_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as file:
                metadata = file.metadata() or {}
                missing = [name for name in TENSORS if name not in file.keys()]
                if missing:
                    raise DomainError(f"{path}: damaged domain file ({', '.join(missing)} missing); fit it again")
                tensors = {name: file.get_tensor(name) for name in TENSORS}
            model = cls(
                mean=tensors["mean"].astype(np.float32),
                precision=tensors["precision"].astype(np.float32),
                reference_distances=tensors["reference_distances"].astype(np.float64),
                threshold=float(tensors["threshold"].reshape(-1)[0]),
                quantile=float(metadata.get("quantile", DEFAULT_QUANTILE)),
                num_images=int(metadata.get("num_images", 0)),
                source=metadata.get("source", ""),
            )
            stated_dim = int(metadata.get("feature_dim", model.feature_dim))
        except DomainError:
            raise
        except (SafetensorError, OSError, ValueError, IndexError, TypeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DomainError(f"{path}: damaged domain file ({reason}); fit it again") from error
        dim = model.feature_dim
        consistent = (
            model.mean.ndim == 1
            and model.precision.shape == (dim, dim)
            and model.reference_distances.ndim == 1
            and len(model.reference_distances) > 0
            and stated_dim == dim
            and all(np.isfinite(a).all() for a in (model.mean, model.precision, model.reference_distances))
            and np.isfinite(model.threshold)
            and bool(np.all(np.diff(model.reference_distances) >= 0))
        )
        if not consistent:
            raise DomainError(f"{path}: damaged domain file (inconsistent shapes or values); fit it again")
        if feature_dim is not None and feature_dim != dim:
            raise DomainError(
                f"{path}: the domain model has {dim} features but this model's vision tower gives {feature_dim}: "
                "it was fitted with another model; fit it again"
            )
        return model


# -- fitting from images ------------------------------------------------------------------------------------


def image_paths(sources: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files from folders (searched recursively), glob patterns (`**` allowed) and single files, sorted
    and without repeats; names that are not image files (by suffix, any case) are skipped in folders and globs."""
    from data.folder import IMAGE_SUFFIXES  # the project's one list of image suffixes; lazy: data imports us

    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: list[Path] = []
    for source in sources:
        text = os.path.expanduser(str(source))
        path = Path(text)
        if glob.has_magic(text):
            matches = [Path(p) for p in glob.glob(text, recursive=True)]
            files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            files = [path]
        else:
            raise DomainError(f"{source}: no such file or folder")
        if not files:
            raise DomainError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        found.extend(sorted(files))
    return list(dict.fromkeys(found))


def image_features(
    engine: ImageAnalyzer, images: Sequence[ImageInput], description: str = "domain features"
) -> np.ndarray:
    """Pooled vision features [N, D] of images (paths, PIL images, arrays), one model call each, with progress."""
    rows = []
    for image in tqdm(images, desc=description, unit="image", disable=len(images) < 2):
        analysis = engine.encode([load_image(image)]).analysis
        rows.append(analysis.pooled_features[0].detach().float().cpu().numpy())
    if not rows:
        raise DomainError(f"{description}: no images given")
    return np.stack(rows).astype(np.float64)


def fit_domain(
    engine: ImageAnalyzer,
    images: Sequence[ImageInput],
    validation_images: Sequence[ImageInput] | None = None,
    source: str = "",
    quantile: float = DEFAULT_QUANTILE,
) -> DomainModel:
    """The domain of `images` as `engine`'s model sees it; `validation_images` (else 20% of `images`) set the
    threshold. Use the checkpoint's own training images, and validation images of the same domain if any."""
    fit = image_features(engine, images, "domain features (fit)")
    held_out = None
    if validation_images is not None:
        held_out = image_features(engine, validation_images, "domain features (threshold)")
    return DomainModel.fit(fit, held_out, quantile=quantile, source=source)
