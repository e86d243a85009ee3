"""`python -m sdsup.demo --workdir=DIR`: a local page for text -> editable layout -> image on a finished workdir.

  layouts.py   what the page does to layouts, testable without a browser: ids to and from the page, uploaded
               layout files (palette colours or ids, resized, snapped) and photos, the palette PNG, agreement
               between a layout and the evaluation segmenter's reading
  commands.py  the `python -m sdsup.sample ...` commands that reproduce what the page made
  engine.py    the workdir's models behind the page (through `sdsup.inference`), warm-up compiles in the
               background, progress, the files of each generation
  server.py    the HTTP server (standard library) and its JSON API; static/ holds the page
  __main__.py  the entry point (flags -> engine -> server)

Why not gradio (the field's convention): its release pins pillow < 13 (this project runs on 13) and adds
some twenty packages, and its image editor paints anti-aliased RGBA strokes at screen resolution, which
would have to be snapped back to class ids; this page paints class ids directly into the map at the model's
resolution, so what is painted is exactly what conditions the image. docs/demo.md says more.
"""
