"""Tests of runtime: schedules and runner processes (fusion/runtime)."""
