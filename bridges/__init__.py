"""Bridges (C2C fusers) between two models: alignment, training, evaluation, storage."""
