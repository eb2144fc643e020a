"""Tests of the command line (fusion/cli)."""
