"""Tests of keys and the registry (fusion/keys)."""
