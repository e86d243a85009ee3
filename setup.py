"""sdsup: semantic diffusion supervision in JAX/Flax."""

import setuptools

# Lower bounds are the versions this project is tested with; no upper pins
# unless a fact forces one.
INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "clu>=0.0.12",
    "ml-collections>=1.1",
    "absl-py>=2.1",
    "numpy>=2.0",
    # FID's matrix square root (scipy.linalg.sqrtm); jax needs scipy too.
    "scipy>=1.13",
    "pillow>=10.0",
    # Input: tfds builders written as array_record, read with grain.
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8",
    # Runs sharing a data_dir build each dataset version once (sdsup.data.registry.prepare).
    "filelock>=3.0",
    "grain>=0.2.18",
    # tfds' download_and_prepare imports it without declaring it (tfds 4.9.10).
    "importlib_resources>=6.0",
    # clu's metric writers need TensorFlow and tensorboard; the CPU build so
    # that a GPU user's TF never grabs the accelerator JAX is using.
    "tensorflow-cpu>=2.21",
    "tensorboard>=2.21",
    # Interop: file formats, tokenizers and the PyTorch model classes.
    "safetensors>=0.4",
    "transformers>=5.0",
    "diffusers>=0.40",
    "tqdm>=4.60",  # progress bars (python -m sdsup.caption)
]

EXTRAS_REQUIRE = {
    # torch is only the PyTorch side of the interop tests and benchmarks.
    # pytest-xdist: the suite runs on 2 processes (`-n 2`); XLA compiles one program per core.
    # 3.8 added --no-loadscope-reorder, which keeps the slowest files first (tests/conftest.py).
    # selenium: drives the system's Chromium in the demo's browser test (tests/test_demo.py).
    "test": ["pytest>=8.0", "pytest-xdist>=3.8", "torch>=2.4", "selenium>=4.51"],
    "tpu": ["jax[tpu]>=0.10"],
    "cuda": ["jax[cuda12]>=0.10"],
}

setuptools.setup(
    name="sdsup",
    version="0.1.0",
    description="Semantic diffusion supervision: text -> layout -> image with adversarial segmentation supervision, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["sdsup", "sdsup.*"]),
    # Files read at run time: the scenes vocabulary, the text the converters write next to an export, the demo page.
    package_data={"sdsup": ["data/*.txt", "convert/templates/*.md", "convert/templates/*.template",
                            "convert/templates/export_readme/*.md", "demo/static/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
