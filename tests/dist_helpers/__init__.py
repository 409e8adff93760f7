"""Helpers shared by the model/data/training tests and the scripts that multi-process tests launch."""
