"""Fusion: privacy-preserving fusion of institutions' sensor feeds into a shared, queryable store."""
