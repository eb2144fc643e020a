"""Tests of configuration (fusion/config)."""
