"""Tests of the demo federation (fusion/demo)."""
