"""Imaging: slice geometry, pixel decoding and the volume a series becomes."""
