"""Few-shot: the patch memory bank, the one fusion rule, reference-driven verdicts, profiles on disk, the fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from assistant.config import ReferenceConfig, Settings, SettingsError
from assistant.engine import LocalEngine
from assistant.profiles import Profile, ProfileError, enroll, image_side_fingerprint, profile_names
from assistant.references import PatchBank, ReferenceEvidence, fuse, greedy_coreset, patch_features
from eval.calibrate import fit_hinge_logistic
from tests.helpers import texture

SPOT = (40, 20)  # (x, y) of the drawn defect in `with_spot`


def with_spot(image: Image.Image) -> Image.Image:
    spotted = image.convert("RGB")
    x, y = SPOT
    ImageDraw.Draw(spotted).ellipse((x - 6, y - 6, x + 6, y + 6), fill=(255, 0, 0))
    return spotted


@pytest.fixture(scope="module")
def engine(tiny_path):
    return LocalEngine.from_pretrained(tiny_path, device="cpu")


def test_patch_features_are_unit_rows_whose_dot_is_the_mean_cosine():
    levels = [torch.randn(2, 16, 8), torch.randn(2, 16, 8)]
    features = patch_features(levels, 1)
    assert features.shape == (2, 16, 16)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    cosines = [torch.nn.functional.cosine_similarity(level[0, 0], level[1, 3], dim=0) for level in levels]
    assert float(features[0, 0] @ features[1, 3]) == pytest.approx(float(sum(cosines) / 2), abs=1e-5)


def test_bank_compares_like_scales_and_finds_the_odd_patch():
    torch.manual_seed(0)
    normal = [torch.randn(1, 1, 4).expand(3, 16, 4).clone()]  # every patch of the 3 crops alike
    bank = PatchBank.from_features(normal, [3], 1)
    assert bank.overview.shape[0] == 16 and bank.tiles.shape[0] == 32
    query = [normal[0].clone()]
    query[0][2, 5] = -query[0][2, 5]  # one patch of a tile turned around
    distances = bank.distances(query, [3], 1)
    assert distances.shape == (3, 4, 4)
    assert float(distances[2].flatten()[5]) == pytest.approx(2.0, abs=1e-5)  # cosine -1
    assert float(distances.flatten().topk(2).values[1]) == pytest.approx(0.0, abs=1e-5)
    no_tiles = PatchBank(bank.overview, bank.overview[:0])  # normals without tiles: tiles compared with overviews
    assert torch.allclose(no_tiles.distances(query, [3], 1), distances, atol=1e-5)


def test_bounded_banks_keep_their_bound_and_the_coreset_keeps_rare_patches():
    common = torch.nn.functional.normalize(torch.randn(1, 32) + 0.01 * torch.randn(500, 32), dim=1)
    rare = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    features = torch.cat([common, rare])
    chosen = set(greedy_coreset(features, 8).tolist())
    assert {500, 501, 502} <= chosen and len(chosen) == 8
    bank = PatchBank(features, features[:100])
    assert len(bank.coreset(50)) == 100 and len(bank.subsampled(50)) == 100
    assert len(bank.subsampled(1000)) == len(bank)


def test_fuse_is_the_documented_rule():
    maps = torch.full((3, 2, 2), 0.2)
    distances = torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.1, 0.8], [0.1, 0.1]], [[0.1, 0.1], [0.1, 0.1]]])
    evidence = ReferenceEvidence(distances, torch.tensor([0.8, 0.1]))  # images: crops 0-1, crop 2
    config = ReferenceConfig(weight=10.0, shift=0.3, map_weight=0.5)
    fused_maps, logits = fuse(maps, torch.tensor([0.5, -1.0]), evidence, [2, 1], config)
    assert logits.tolist() == pytest.approx([0.5 + 10 * 0.5, -1.0])  # the second image is under the knee
    probability = torch.sigmoid(torch.tensor(5.5))
    assert float(fused_maps[1, 0, 1]) == pytest.approx(0.5 * 0.2 + 0.5 * float(probability))  # the farthest patch
    assert float(fused_maps[0, 0, 0]) == pytest.approx(0.1 + 0.5 * float(probability) * 0.1 / 0.8)
    with pytest.raises(SettingsError, match="reference.neighbourhood"):
        Settings.parse(["reference.neighbourhood=0"])


def test_without_references_the_verdict_is_the_experts_own(engine):
    image = texture(1)
    analysis = engine.encode([image]).analysis
    assert analysis.reference is None and analysis.expert_heatmaps is None
    assert torch.equal(analysis.logits, analysis.expert.logits)
    verdict = engine.analyze(image)
    assert verdict.reference_distance is None
    assert verdict.expert_score == pytest.approx(float(torch.sigmoid(analysis.expert.logits[0])))


def test_a_reference_drives_score_heatmap_and_boxes_but_never_the_prompt(tiny_path):
    # neighbourhood 1: the tiny tower's 4 x 4 patch grid is too coarse for a 3 x 3 window
    settings = Settings(reference={"neighbourhood": 1, "shift": 0.1})  # under the knee nothing moves
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu", settings=settings)
    normal = texture(2)
    query = with_spot(texture(2))
    alone, compared = engine.encode([query]), engine.encode([normal, query])
    assert compared.analysis.reference is not None
    distances = compared.analysis.reference.distances[0]  # the whole-image crop's patch grid
    side = distances.shape[-1]
    peak_y, peak_x = np.unravel_index(int(distances.argmax()), distances.shape)
    x, y = SPOT
    assert (peak_x, peak_y) == (x * side // query.width, y * side // query.height)  # the patch holding the spot
    assert torch.equal(compared.analysis.expert.logits, alone.analysis.expert.logits)
    assert not torch.equal(compared.analysis.logits, alone.analysis.logits)  # the references moved the score
    assert not torch.equal(compared.analysis.heatmaps[0], alone.analysis.heatmaps[0])
    # the prompt's query tokens (adverb, expert and ROI tokens) are those of the query alone
    query_tokens = compared.embeddings[-alone.layouts[-1].num_embeddings :]
    assert torch.equal(query_tokens, alone.embeddings)
    with_reference, without = engine.analyze(query, [normal]), engine.analyze(query)
    farthest = float(compared.analysis.reference.distances.max())  # over all crops
    assert with_reference.reference_distance == pytest.approx(farthest, abs=1e-6)
    assert not np.array_equal(with_reference.heatmap, without.heatmap)
    same = engine.analyze(normal, [normal])
    assert same.reference_distance == pytest.approx(0.0, abs=1e-4)  # an image against itself


def test_more_references_do_not_grow_the_bank_past_its_bound(tiny_path):
    engine = LocalEngine.from_pretrained(tiny_path, device="cpu", settings=Settings(reference={"max_patches": 20}))
    references = [texture(10 + i) for i in range(6)]
    engine.encode([*references, texture(3)])
    (bank,) = engine._banks.values()
    assert bank.overview.shape[0] <= 20 and bank.tiles.shape[0] <= 20


def test_a_profile_round_trips_and_refuses_another_model(engine, tiny_path, tmp_path):
    from assistant.factory import tiny_assistant

    paths = []
    for index in range(7):
        texture(30 + index).save(path := tmp_path / f"{index}.png")
        paths.append(path)
    profile = enroll(engine, "weave", paths, false_alarm_rate=0.1, source="drawn textures")
    assert profile.num_images == 7 and profile.num_threshold_images == 1 and 0.0 < profile.threshold <= 1.0
    assert profile.domain is not None  # 6 bank images >= the domain's minimum
    assert profile.fingerprint == image_side_fingerprint(engine.model)
    model = tmp_path / "model"
    folder = profile.save(model)
    assert profile_names(model) == ["weave"]
    (model / "profiles" / "weave.partial").mkdir()  # a killed save: not a profile, cleared by the next save
    (model / "profiles" / "weave.partial" / "profile.json").write_text("{}")
    assert profile_names(model) == ["weave"]
    profile.save(model)
    assert not (model / "profiles" / "weave.partial").exists()
    loaded = Profile.load(model, "weave", profile.fingerprint, engine.model.config.vision_config.hidden_size)
    assert torch.allclose(loaded.bank.overview, profile.bank.overview, atol=1e-2)  # stored in half precision
    assert loaded.threshold == profile.threshold and loaded.domain.threshold == profile.domain.threshold
    other, _ = tiny_assistant(seed=1, roi=True)
    with pytest.raises(ProfileError, match="made with another model"):
        Profile.load(model, "weave", image_side_fingerprint(other))
    with pytest.raises(ProfileError, match="no profile 'knit'.*known: weave"):
        Profile.load(model, "knit")
    record = json.loads((folder / "profile.json").read_text())
    (folder / "bank.safetensors").write_bytes(b"broken")
    with pytest.raises(ProfileError, match="damaged profile"):
        Profile.load(model, "weave")
    assert record["false_alarm_rate"] == 0.1
    with pytest.raises(ProfileError, match="profile name"):
        Profile.load(model, "../escape")


def test_a_profiles_threshold_holds_its_false_alarm_rate_and_a_spot_is_flagged(engine, tmp_path):
    paths = []
    for index in range(10):
        texture(50, size=96).rotate(90 * (index % 4)).save(path := tmp_path / f"{index}.png")
        paths.append(path)
    profile = enroll(engine, "flat", paths, false_alarm_rate=0.5)
    engine.use_profile(profile)
    normal = engine.analyze(texture(50).rotate(180), profile="flat")
    spotted = engine.analyze(with_spot(texture(50).rotate(180)), profile="flat")
    assert normal.reference_distance < spotted.reference_distance
    assert spotted.score > normal.score and spotted.anomalous
    with pytest.raises(ProfileError, match="not both"):
        engine.analyze(texture(50), [texture(51)], profile="flat")


def test_the_hinge_fit_recovers_a_known_rule():
    rng = np.random.default_rng(0)
    distance = rng.uniform(0, 1, 4000)
    offset = rng.normal(-1, 1, 4000)
    labels = (rng.uniform(size=4000) < 1 / (1 + np.exp(-(offset + 6 * np.maximum(0, distance - 0.4))))).astype(float)
    slope, knee = fit_hinge_logistic(distance, offset, labels)
    assert slope == pytest.approx(6, rel=0.25) and knee == pytest.approx(0.4, abs=0.08)
    flat = (rng.uniform(size=4000) < 1 / (1 + np.exp(-offset))).astype(float)
    assert fit_hinge_logistic(distance, offset, flat)[0] < 1.0  # no evidence in the distance: no weight


def test_a_profile_is_refused_under_other_settings_and_read_again_when_replaced(tiny_path, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    engine = LocalEngine.from_pretrained(model, device="cpu")
    paths = []
    for index in range(4):
        texture(70 + index).save(path := tmp_path / f"{index}.png")
        paths.append(path)
    enroll(engine, "weave", paths).save(model)
    first = engine.profile("weave")
    assert engine.profile("weave") is first  # read once
    replaced = enroll(engine, "weave", paths[:3], false_alarm_rate=0.5)
    replaced.save(model)
    assert engine.profile("weave").num_images == 3  # the file changed: read again
    other = LocalEngine.from_pretrained(model, device="cpu", settings=Settings(reference={"neighbourhood": 1}))
    with pytest.raises(ProfileError, match="another model or other settings"):
        other.analyze(texture(70), profile="weave")
    with pytest.raises(ProfileError, match="not both"):
        engine.analyze(texture(70), [texture(71)], profile="weave")
