"""Baseline compression methods (registered into sparse_kv_cache.METHODS)."""
