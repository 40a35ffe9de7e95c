"""The pattern library: these .sa files, installed as the package data of sparsec.patterns."""
