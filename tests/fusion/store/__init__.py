"""Tests of the store, ledger, runs, provenance and SQL (fusion/store)."""
