"""Evaluation metrics for generated images."""
