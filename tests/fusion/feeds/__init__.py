"""Tests of feeds and scanning (fusion/feeds)."""
