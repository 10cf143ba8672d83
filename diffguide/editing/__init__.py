"""Inversion and editing: DDIM, CFG++ and null-text inversion."""
