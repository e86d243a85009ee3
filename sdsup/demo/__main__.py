r"""Serves the demo page on a finished workdir: prompt -> editable layout -> image(s), with the segmenter's reading.

  python -m sdsup.demo --workdir=workdirs/scenes              # then open http://127.0.0.1:7860/
  python -m sdsup.demo --workdir=DIR --port=8000 --out=demo_runs

Every result's files (images, the layout as .npy ids and palette .png, the
segmenter's readings) go under --out (default: a new temporary folder), and
the page shows the `python -m sdsup.sample ...` command that makes the same
images. The logic is in sdsup/demo/ (docs/demo.md).
"""

import types

from absl import flags, logging

from sdsup import cli
from sdsup.demo import engine as engine_lib
from sdsup.demo import server as server_lib


def define_flags():
    f = types.SimpleNamespace()
    f.workdir = flags.DEFINE_string("workdir", None, "A training workdir whose ldm and vae stages have finished.")
    f.port = flags.DEFINE_integer("port", 7860, "Port to serve on (0: any free port).")
    f.host = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; the page runs models on request, so the "
                                 "default keeps it to this machine.")
    f.out = flags.DEFINE_string("out", None, "Folder for the generated files (default: a new temporary folder).")
    f.warm_up = flags.DEFINE_bool("warm_up", True, "Compile the samplers in the background at start.")
    flags.mark_flags_as_required(["workdir"])
    return f


def main(f):
    if not 0 <= f.port.value <= 65535:
        raise engine_lib.DemoError(f"--port must be between 0 and 65535, got {f.port.value}")
    engine = engine_lib.Engine(f.workdir.value, f.out.value)
    cli.use_compilation_cache(engine.config)
    server = server_lib.make_server(engine, f.host.value, f.port.value)
    for notice in engine.notices():
        logging.warning("%s", notice)
    if f.warm_up.value:
        engine.start_warm_up()
    print(f"sdsup demo on {engine.workdir.path}: open {server.url} (files in {engine.out}; Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    cli.run(main, define_flags)
