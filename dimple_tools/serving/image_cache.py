"""An image-feature cache for the server: the vision tower's output for an image already seen is reused.

The key of an image is a hash of its decoded pixels (the processor's `pixel_values` rows of that image) and its
patch grid, so the same picture sent twice (or by two clients) is encoded once, whatever its URL or file name.
Bounded in entries (least recently used first out); hits and misses are counted for `/metrics`. The vision tower
encodes each image on its own (attention never crosses images), so a cached image's features are those a batch
would compute.
"""

from __future__ import annotations

import collections
import hashlib
import threading

import torch

#: Default bound: images whose features are kept (`dimple-serve --image-cache-size`; 0 turns the cache off).
IMAGE_CACHE_SIZE = 64


def image_key(pixels: torch.Tensor, grid: torch.Tensor) -> str:
    digest = hashlib.sha256(pixels.detach().contiguous().cpu().numpy().tobytes())
    digest.update(str((tuple(grid.tolist()), str(pixels.dtype), tuple(pixels.shape))).encode())
    return digest.hexdigest()


class ImageFeatureCache:
    """`cache.features(get_image_features, pixel_values, image_grid_thw)`: the features of every image of a batch,
    those already seen taken from the cache, the others computed in one call and kept."""

    def __init__(self, size: int = IMAGE_CACHE_SIZE):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def features(self, compute, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        patches = image_grid_thw.prod(-1).tolist()  # rows of pixel_values per image
        pieces = list(torch.split(pixel_values, patches))
        keys = [image_key(piece, grid) for piece, grid in zip(pieces, image_grid_thw)]
        found = {}
        with self.lock:
            for key in keys:
                if key in self.entries:
                    self.entries.move_to_end(key)
                    found[key] = self.entries[key]
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            computed = compute(torch.cat([pieces[i] for i in missing]), image_grid_thw[missing])
            # an image's feature rows are its patches over the merge factor: the same ratio for every image
            total = sum(patches[i] for i in missing)
            sizes = [patches[i] * computed.shape[0] // total for i in missing]
            for i, piece in zip(missing, torch.split(computed, sizes)):
                found[keys[i]] = piece
        with self.lock:
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            if self.size > 0:
                for i in missing:
                    self.entries[keys[i]] = found[keys[i]]
                    self.entries.move_to_end(keys[i])
                while len(self.entries) > self.size:
                    self.entries.popitem(last=False)
        return torch.cat([found[key] for key in keys])

    def install(self, model) -> None:
        """Route `model.get_image_features` (what `diffusion_generate` encodes images with) through the cache."""
        compute = model.get_image_features

        def cached(pixel_values, image_grid_thw):
            return self.features(compute, pixel_values, image_grid_thw)

        model.get_image_features = cached
