import torch

from assistant.config import ExpertConfig
from assistant.expert import AnomalyExpert


def make_expert(levels=3, width=48, side=6, pooled=2):
    config = ExpertConfig(
        feature_layers=list(range(levels)),
        embedding_dim=16,
        class_dim=8,
        attention_dim=12,
        predictor_dim=10,
        pooled_side=pooled,
    )
    torch.manual_seed(0)
    return AnomalyExpert(config, width, side * side), config


def features(crops, side=6, width=48, levels=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    final = torch.randn(crops, side * side, width, generator=generator)
    return final, [torch.randn(crops, side * side, width, generator=generator) for _ in range(levels)]


def test_output_shapes_for_several_images():
    expert, _ = make_expert()
    final, levels = features(1 + 4 + 1 + 2)
    out = expert(final, levels, [5, 1, 2])
    assert out.maps.shape == (8, 6, 6)
    assert out.crop_tokens.shape == (8, 4, 48)
    assert out.global_tokens.shape == (3, 48)
    assert out.logits.shape == (3,)
    assert ((out.maps >= 0) & (out.maps <= 1)).all()
    assert ((out.scores > 0) & (out.scores < 1)).all()


def test_images_are_independent():
    """An image's outputs must not depend on the other images in the batch."""
    expert, _ = make_expert()
    final, levels = features(7)
    together = expert(final, levels, [5, 2])
    alone = expert(final[5:], [level[5:] for level in levels], [2])
    torch.testing.assert_close(together.maps[5:], alone.maps)
    torch.testing.assert_close(together.logits[1:], alone.logits)
    torch.testing.assert_close(together.global_tokens[1:], alone.global_tokens)


def test_look_back_uses_the_whole_image_crop():
    """Changing crop 0 changes the class embedding and so every crop's map; other crops do not."""
    expert, _ = make_expert()
    final, levels = features(3)
    base = expert(final, levels, [3]).maps
    changed = final.clone()
    changed[0] += 3.0
    assert not torch.allclose(expert(changed, levels, [3]).maps[2], base[2])
    changed = final.clone()
    changed[2] += 3.0
    torch.testing.assert_close(expert(changed, levels, [3]).maps[1], base[1])


def test_pooled_queries_follow_the_map():
    """With a map that is zero except one quadrant, that quadrant's query is the mean of its tokens."""
    expert, _ = make_expert()
    final, _ = features(1)
    maps = torch.zeros(1, 6, 6)
    maps[0, :3, :3] = 1.0
    selector = expert.selector
    tokens, global_tokens, logits = selector(final, maps, [1])
    assert tokens.shape == (1, 4, 48) and global_tokens.shape == (1, 48)
    # Only the top-left pooled cell has weight, so the global token is that cell's selected token.
    torch.testing.assert_close(global_tokens[0], tokens[0, 0], atol=1e-4, rtol=1e-4)


def test_gradients_reach_all_parameters():
    expert, _ = make_expert()
    final, levels = features(5)
    out = expert(final, levels, [5])
    (out.logits.sum() + out.maps.mean()).backward()
    missing = [name for name, p in expert.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
