"""Glue for the libraries sparsec plugs into (transformers)."""
