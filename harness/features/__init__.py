"""Backbone features on disk: the cache (:mod:`harness.features.cache`) and the cached extraction loop
(:mod:`harness.features.extract`)."""

from harness.features.cache import (
    DTYPES,
    CacheGroup,
    CacheInfo,
    CacheNotWritableError,
    CacheStats,
    FeatureCache,
    FeatureKey,
    default_cache_dir,
    default_max_bytes,
    format_bytes,
    format_cache_info,
    frame_identity,
)
from harness.features.extract import extract_sequence_features

__all__ = [
    "DTYPES",
    "CacheGroup",
    "CacheInfo",
    "CacheNotWritableError",
    "CacheStats",
    "FeatureCache",
    "FeatureKey",
    "default_cache_dir",
    "default_max_bytes",
    "extract_sequence_features",
    "format_bytes",
    "format_cache_info",
    "frame_identity",
]
