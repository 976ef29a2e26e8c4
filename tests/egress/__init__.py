"""Tests of egress: destinations, the sender, STOW-RS."""
