"""The model pool: balanced membership masks, training, and the on-disk cache."""

from .build import Pool, autocast_for, build_pool, pool_keep_masks
from .masks import balanced_keep_masks
from .store import PoolStore

__all__ = ["Pool", "PoolStore", "autocast_for", "balanced_keep_masks", "build_pool", "pool_keep_masks"]
