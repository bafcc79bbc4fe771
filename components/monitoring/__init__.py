"""Drift: do new images still look like the training data, as the frozen trunk sees them."""
