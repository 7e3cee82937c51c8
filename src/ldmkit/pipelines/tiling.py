"""Overlapping tiles blended with smooth weights: the one implementation lives in ``ldmkit.models.tiling``
(the autoencoders' tiled decode uses it too, and models sit below pipelines); the pipelines import it here."""

from ..models.tiling import blend_tiles, ramp, tile_starts, tile_weight, tiles

__all__ = ["blend_tiles", "ramp", "tile_starts", "tile_weight", "tiles"]
