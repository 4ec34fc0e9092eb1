"""Stores: the content-addressed artifact cache, the DuckDB data store, the HNSW vector store.

Small and typed; imports nothing from `runner` and nothing from the ML stack.
"""

from stores.cache import Artifact, ArtifactCache, CacheError, default_cache_dir
from stores.hashing import StatCache, canonical_json, hash_bytes, hash_json

__all__ = [
    "Artifact",
    "ArtifactCache",
    "CacheError",
    "StatCache",
    "canonical_json",
    "default_cache_dir",
    "hash_bytes",
    "hash_json",
]
