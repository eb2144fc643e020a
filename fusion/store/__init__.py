"""Fusion: a package of modules grouped by concept (see its docstring)."""
