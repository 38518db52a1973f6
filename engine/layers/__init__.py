"""Layers shared by both model families."""
