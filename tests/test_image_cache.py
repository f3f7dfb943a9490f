"""The server's image-feature cache (issue 35, item 2): the same features as the vision tower, hits for images
seen before (whatever their place in a batch), eviction at its bound, and decodes unchanged by it."""

import torch

from dimple.modeling_dimple import DimpleModel
from dimple_tools.serving.image_cache import ImageFeatureCache
from dimple_tools.tiny.configs import tiny_config
from test_generation import image_inputs, run


def two_images():
    first, second = image_inputs(seed=1), image_inputs(seed=2)
    return first["pixel_values"], second["pixel_values"], first["image_grid_thw"]


def test_cached_features_equal_the_vision_towers_and_count_hits():
    torch.manual_seed(0)
    model = DimpleModel(tiny_config()).eval()
    a, b, grid = two_images()
    cache = ImageFeatureCache(size=8)
    with torch.no_grad():
        reference = model.get_image_features(torch.cat([a, b]), torch.cat([grid, grid]))
        first = cache.features(model.get_image_features, torch.cat([a, b]), torch.cat([grid, grid]))
        assert (cache.hits, cache.misses) == (0, 2)
        torch.testing.assert_close(first, reference)
        swapped = cache.features(model.get_image_features, torch.cat([b, a]), torch.cat([grid, grid]))
    assert (cache.hits, cache.misses) == (2, 2)
    rows = reference.shape[0] // 2
    assert torch.equal(swapped, torch.cat([first[rows:], first[:rows]]))


def test_the_least_recently_used_image_leaves_at_the_bound():
    torch.manual_seed(0)
    model = DimpleModel(tiny_config()).eval()
    a, b, grid = two_images()
    cache = ImageFeatureCache(size=1)
    with torch.no_grad():
        cache.features(model.get_image_features, a, grid)
        cache.features(model.get_image_features, b, grid)  # evicts a
        assert len(cache.entries) == 1
        cache.features(model.get_image_features, b, grid)
        assert (cache.hits, cache.misses) == (1, 2)
        cache.features(model.get_image_features, a, grid)
    assert (cache.hits, cache.misses) == (1, 3)


def test_a_decode_through_the_cache_is_the_same_and_encodes_each_image_once():
    torch.manual_seed(0)
    model = DimpleModel(tiny_config(initializer_range=0.2)).eval()
    inputs = image_inputs(batch=2)
    settings = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", use_cache=True)
    plain = run(model, inputs, **settings).sequences
    cache = ImageFeatureCache(size=8)
    cache.install(model)
    assert torch.equal(run(model, inputs, **settings).sequences, plain)
    assert torch.equal(run(model, inputs, **settings).sequences, plain)
    assert (cache.hits, cache.misses) == (2, 2)
