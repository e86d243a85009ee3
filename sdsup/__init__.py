"""sdsup: semantic diffusion supervision in JAX/Flax."""

import os

# TensorFlow (pulled in by tfds and clu) logs only errors unless the user says otherwise; this has to
# happen before any sdsup module imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
