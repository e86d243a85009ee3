"""Text that the converters write next to an export, kept as files rather than as strings in code.

  export_readme/*.md           the pieces of an exported pipeline's README.md (`sdsup.convert.exporter`)
  class_embedding_recipe.md    controlnet/README.md of a class-embedding ControlNet (`sdsup.convert.controlnet`)
  layout_pipeline.py.template  copied as it is, as layout_pipeline.py, next to a class-embedding export: a
                               program for PyTorch and diffusers (not a .py here, so that it is no module of
                               sdsup's)

Placeholders are `string.Template`'s ($name). The files are package data
(setup.py), so an installed sdsup has them too.
"""

import importlib.resources
import string


def read(name: str) -> str:
    """The text of the template file `name`, a "/"-separated path relative to this directory."""
    resource = importlib.resources.files(__name__)
    for part in name.split("/"):
        resource = resource / part
    return resource.read_text(encoding="utf-8")


def fill(name: str, **values) -> str:
    """Template `name` with its $placeholders replaced by `values` (every placeholder must be given)."""
    return string.Template(read(name)).substitute(values)
