"""Evaluation metrics for generated images: FID (`fid.py`) today; the rest of the suite lands here."""
