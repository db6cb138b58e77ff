"""Domain awareness: a Gaussian over a checkpoint's training-image features says whether a new image is alike.

The model-level tests fit on grayscale noise textures seen by a tiny random model (the "very different" family
is colourful scenes drawn in code); the rest use Gaussian features drawn in numpy, where the in-domain rate of
new images is known. Every surface says what the check found: the CLI, its JSON, `info`, export.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from assistant.domain import DOMAIN_FILE, DomainError, DomainModel, fit_domain, image_features, image_paths
from assistant.engine import LocalEngine
from assistant.errors import AssistantError
from tests.helpers import scene, texture

DIM = 16


def gaussian(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Correlated, offset Gaussian features: one fixed domain for every call with the same `rng` stream."""
    mixing = np.random.default_rng(123).standard_normal((dim, dim)) / np.sqrt(dim)
    return 3.0 * rng.standard_normal((n, dim)) @ mixing.T + 5.0


@pytest.fixture(scope="module")
def textures_seen(tiny_path, tmp_path_factory):
    """(engine, domain fitted from texture files in a folder, held-out texture features, scene features, fit and
    threshold features)."""
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu")
    folder = tmp_path_factory.mktemp("textures")
    (folder / "sub").mkdir()
    for index in range(60):  # half in a subfolder with an upper-case suffix: found all the same
        texture(index).save(folder / "sub" / f"{index:03d}.PNG" if index % 2 else folder / f"{index:03d}.png")
    files = image_paths(folder)
    assert len(files) == 60
    validation = [texture(100 + index) for index in range(20)]
    domain = fit_domain(engine, files, validation, source=str(folder))
    held_out = image_features(engine, [texture(1000 + index) for index in range(30)])
    scenes = image_features(engine, [scene(index) for index in range(12)])
    fit, threshold = image_features(engine, files), image_features(engine, validation)
    return engine, domain, held_out, scenes, fit, threshold


def test_held_out_textures_are_in_domain_and_colour_scenes_are_not(textures_seen):
    engine, domain, held_out, scenes, _, _ = textures_seen
    assert domain.feature_dim == engine.model.config.vision_config.hidden_size
    assert domain.num_images == 60 and len(domain.reference_distances) == 20
    held_scores, held_in = domain.check_many(held_out)
    scene_scores, scene_in = domain.check_many(scenes)
    assert held_in.mean() >= 0.8
    assert scene_in.mean() <= 0.1
    assert np.median(scene_scores) < np.median(held_scores)
    assert np.median(domain.distances(scenes)) > 2 * domain.threshold


def test_threshold_comes_from_the_held_out_images_not_the_fit_ones(textures_seen):
    _, domain, held_out, _, fit, threshold = textures_seen
    np.testing.assert_allclose(domain.reference_distances, np.sort(domain.distances(threshold)), rtol=1e-9)
    assert domain.threshold == pytest.approx(np.quantile(domain.distances(threshold), 0.99, method="higher"))
    in_sample = np.quantile(domain.distances(fit), 0.99, method="higher")
    assert in_sample < domain.threshold  # fit images are optimistically close: an in-sample cut is too tight
    assert (domain.distances(held_out) <= in_sample).mean() < domain.check_many(held_out)[1].mean()


def test_new_images_of_the_domain_are_in_domain_at_about_the_quantile():
    rng = np.random.default_rng(0)
    fresh = gaussian(rng, 5000)
    given = DomainModel.fit(gaussian(rng, 60), gaussian(rng, 400), quantile=0.99)
    split = DomainModel.fit(gaussian(rng, 500), quantile=0.99)
    for domain in (given, split):
        rate = domain.check_many(fresh)[1].mean()
        assert 0.97 <= rate <= 0.999, rate
    assert (split.num_images, len(split.reference_distances)) == (400, 100)
    features = gaussian(np.random.default_rng(7), 50)
    first, second = DomainModel.fit(features), DomainModel.fit(features)
    np.testing.assert_array_equal(first.reference_distances, second.reference_distances)  # a seeded split


def test_far_domain_is_out_and_score_falls_with_distance():
    rng = np.random.default_rng(1)
    domain = DomainModel.fit(gaussian(rng, 200), gaussian(rng, 100))
    assert domain.check_many(gaussian(rng, 50) + 40.0)[1].sum() == 0
    direction = rng.standard_normal(DIM)
    ray = domain.mean.astype(np.float64) + np.linspace(0, 6, 200)[:, None] * direction
    distances = domain.distances(ray)
    scores, in_domain = domain.check_many(ray)
    assert np.all(np.diff(distances) > 0)
    assert np.all(np.diff(scores) <= 0) and scores[0] == 1.0 and scores[-1] == 0.0
    assert in_domain[0] and not in_domain[-1] and np.all(np.diff(in_domain.astype(int)) <= 0)
    np.testing.assert_array_equal(in_domain, distances <= domain.threshold)
    assert [domain.check(row) for row in ray[::20]] == list(zip(scores[::20], in_domain[::20]))
    # score = share of reference distances at least as far; the threshold image itself is in domain
    reference = domain.reference_distances
    middle = reference[len(reference) // 2]
    assert domain.check(domain.mean) == (1.0, True)
    assert np.mean(reference >= middle) == pytest.approx(
        domain.check_many(_at_distance(domain, middle, direction))[0][0]
    )
    assert domain.check(_at_distance(domain, domain.threshold, direction))[1]
    validation = gaussian(rng, 30)
    everything = DomainModel.fit(gaussian(rng, 100), validation, quantile=1.0)
    assert everything.check_many(validation)[1].all()  # quantile 1: every validation image, the farthest included
    assert everything.check_many(validation)[0].min() == 1 / 30


def _at_distance(domain: DomainModel, squared: float, direction: np.ndarray) -> np.ndarray:
    """A point on the ray from the mean at squared Mahalanobis distance `squared` (a hair inside)."""
    unit = domain.distances(domain.mean.astype(np.float64) + direction)[0]
    return domain.mean.astype(np.float64) + direction * np.sqrt(squared / unit) * (1 - 1e-9)


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    domain = DomainModel.fit(gaussian(rng, 80), gaussian(rng, 30), quantile=0.95, source="bottles/train/good")
    path = domain.save(tmp_path)
    assert path == tmp_path / DOMAIN_FILE and sorted(p.name for p in tmp_path.iterdir()) == [DOMAIN_FILE]
    loaded = DomainModel.load(tmp_path, feature_dim=DIM)
    for name in ("mean", "precision", "reference_distances"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(domain, name))
        assert getattr(loaded, name).dtype == getattr(domain, name).dtype
    assert loaded.precision.dtype == np.float32
    assert (loaded.threshold, loaded.quantile, loaded.num_images, loaded.source) == (
        domain.threshold, 0.95, 80, "bottles/train/good",
    )  # fmt: skip
    probe = gaussian(rng, 20) * 1.5
    for mine, theirs in zip(domain.check_many(probe), loaded.check_many(probe)):
        np.testing.assert_array_equal(mine, theirs)
    assert domain.metadata()["feature_dim"] == str(DIM)
    domain.save(tmp_path)  # over the old file, atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == [DOMAIN_FILE]


def test_real_model_domain_round_trips_beside_a_checkpoint(textures_seen, tmp_path):
    engine, domain, held_out, _, _, _ = textures_seen
    domain.save(tmp_path)
    loaded = DomainModel.load(tmp_path, feature_dim=engine.model.config.vision_config.hidden_size)
    np.testing.assert_array_equal(loaded.check_many(held_out)[0], domain.check_many(held_out)[0])
    assert loaded.source == domain.source


def test_missing_file_is_none(tmp_path):
    assert DomainModel.load(tmp_path) is None
    assert DomainModel.load(tmp_path / "absent") is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing tensor", "inconsistent"])
def test_damaged_file_is_a_one_line_error(tmp_path, damage):
    rng = np.random.default_rng(3)
    path = DomainModel.fit(gaussian(rng, 40), gaussian(rng, 10)).save(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing tensor":
        save_file({"mean": np.zeros(DIM, np.float32)}, str(path))
    else:
        save_file(
            {
                "mean": np.zeros(DIM, np.float32),
                "precision": np.eye(DIM - 1, dtype=np.float32),
                "reference_distances": np.ones(3),
                "threshold": np.ones(1),
            },
            str(path),
        )
    with pytest.raises(DomainError) as caught:
        DomainModel.load(tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, AssistantError)
    assert "\n" not in message and str(path) in message and "damaged" in message


def test_feature_dim_mismatch_is_an_error(tmp_path):
    rng = np.random.default_rng(4)
    domain = DomainModel.fit(gaussian(rng, 40), gaussian(rng, 10))
    domain.save(tmp_path)
    with pytest.raises(DomainError, match=f"has {DIM} features but this model's vision tower gives {DIM + 8}"):
        DomainModel.load(tmp_path, feature_dim=DIM + 8)
    with pytest.raises(DomainError, match="another model"):
        domain.check(np.zeros(DIM + 1))
    with pytest.raises(DomainError, match="threshold images have"):
        DomainModel.fit(gaussian(rng, 40), gaussian(rng, 10)[:, :-1])


def test_fit_refuses_what_cannot_give_a_domain():
    rng = np.random.default_rng(5)
    with pytest.raises(DomainError, match="at least 5 images"):
        DomainModel.fit(gaussian(rng, 4))
    with pytest.raises(DomainError, match="same features"):
        DomainModel.fit(np.ones((10, DIM)))
    with pytest.raises(DomainError, match="NaN"):
        DomainModel.fit(np.full((10, DIM), np.nan))
    with pytest.raises(DomainError, match="quantile"):
        DomainModel.fit(gaussian(rng, 10), quantile=1.5)
    with pytest.raises(DomainError, match="check_many"):
        DomainModel.fit(gaussian(rng, 10)).check(gaussian(rng, 2))


def test_image_paths_from_folders_globs_and_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/b/3.jpeg", "a/4.bmp", "a/b/5.tif", "a/b/6.tiff"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    expected = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file() and p.suffix != ".txt")
    assert image_paths(tmp_path / "a") == expected
    assert image_paths(str(tmp_path / "a" / "**" / "*")) == expected
    assert image_paths([tmp_path / "a" / "1.png", tmp_path / "a" / "1.png"]) == [tmp_path / "a" / "1.png"]
    with pytest.raises(DomainError, match="no such file"):
        image_paths(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DomainError, match="no image files"):
        image_paths(tmp_path / "empty")


def test_every_surface_reports_the_domain(tiny_path, tmp_path, capsys):
    import json
    import shutil

    from assistant.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(40):
        texture(index).save(photos / f"{index}.png")
    texture(500).save(known := tmp_path / "known.png")
    scene(3).save(unknown := tmp_path / "unknown.png")
    argv = ["inspect", "--model", str(model), "--max-new-tokens", "2"]
    assert main([*argv, str(known)]) == 0
    assert "note: domain unknown" in capsys.readouterr().out  # no statistics yet
    assert main(["fit-domain", str(photos), "--model", str(model), "--source", "grey textures"]) == 0
    assert "32 images (grey textures)" in capsys.readouterr().out
    assert main([*argv, str(unknown)]) == 0
    assert "warning: out of domain" in capsys.readouterr().out
    assert main([*argv, "--json", str(unknown)]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["in_domain"] is False and 0.0 <= verdict["domain_score"] < 0.05
    assert main([*argv, "--json", str(known)]) == 0
    assert json.loads(capsys.readouterr().out)["in_domain"] is True
    for index in range(2):  # an evaluation: two textures and two scenes, scored by two rows of the one model
        for kind, image in (("good", texture(600 + index)), ("odd", scene(5 + index))):
            (tmp_path / "bench" / "part" / "test" / kind).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "bench" / "part" / "test" / kind / f"{index}.png")
    evaluation = ["eval", "zeroshot", "--data", str(tmp_path / "bench"), "--image-only", "--model", str(model)]
    assert main([*evaluation, "--scorers", "expert,decision", "--output", str(tmp_path / "run")]) == 0
    assert "Out of the model's domain: 2 of 4 images (50.0%)." in (tmp_path / "run" / "report.md").read_text()
    assert main(["info", "--model", str(model)]) == 0
    assert "- domain: 32 images (grey textures), " in capsys.readouterr().out  # 80% fit, 20% set the threshold
    assert main(["export", str(tmp_path / "exported"), "--model", str(model)]) == 0
    assert (tmp_path / "exported" / DOMAIN_FILE).read_bytes() == (model / DOMAIN_FILE).read_bytes()
    (model / DOMAIN_FILE).write_bytes(b"not a safetensors file")
    assert main([*argv, str(known)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {model / DOMAIN_FILE}: damaged domain file")
    assert main(["fit-domain", str(photos), "--model", str(model)]) == 0  # "fit it again" works on a damaged file
    assert main([*argv, str(known)]) == 0
