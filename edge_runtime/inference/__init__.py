"""Inference: the model package, the sliding-window pipeline and the runners."""
