"""Egress: sending results to their destinations (C-STORE SCU)."""
