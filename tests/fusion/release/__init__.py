"""Tests of release planning, contributions, estimates and quantiles (fusion/release)."""
