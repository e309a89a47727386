"""Hydra configs, shipped as package data; Hydra finds them at ``pkg://twotower.conf``."""
