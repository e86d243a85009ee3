"""Experiments built from the library: the ALDM ablation (`python -m sdsup.experiments.ablation`)."""
