"""Library versions stamped into the configs an export writes (`_diffusers_version`, `transformers_version`).

Loaders only read these as information, so when the library is not
installed any released version string does.
"""

from importlib.metadata import version


def diffusers_version() -> str:
    try:
        return version("diffusers")
    except Exception:  # diffusers not installed: any released version string works
        return "0.27.0"


def transformers_version() -> str:
    try:
        return version("transformers")
    except Exception:  # transformers not installed: any released version string works
        return "4.40.0"
