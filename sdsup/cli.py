"""What every command-line entry point shares: one-line errors, TensorFlow kept off the accelerator, the XLA cache.

A user's mistake (an `SdsupError`: a bad flag value, a missing file, a
workdir without the stage asked for) is printed as one line, `error: ...`,
with exit status 1 and no traceback; SDSUP_DEBUG=1 re-raises it instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
from absl import app

from sdsup.errors import SdsupError

DEBUG_VARIABLE = "SDSUP_DEBUG"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run(main: Callable, define_flags: Callable, flags_parser: Optional[Callable] = None) -> None:
    """Defines the entry point's flags, then `absl.app.run`s `main(flags)` with user errors as one line.

    `define_flags()` returns the entry point's flag holders (any object);
    they are defined here, when the entry point runs, not when its module is
    imported: the CLIs share flag names (--workdir, --seed), so defining them
    at import time would make the modules impossible to import together.
    Positional arguments are refused. For the absl entry points: train,
    sample, evaluate, the ablation.
    """
    holders = define_flags()

    def guarded(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if os.environ.get(DEBUG_VARIABLE):
            return main(holders)
        try:
            return main(holders)
        except SdsupError as e:
            sys.exit(f"error: {one_line(e)}")

    if flags_parser is None:
        app.run(guarded)
    else:
        app.run(guarded, flags_parser=flags_parser)


def run_argparse(run_fn: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]] = None) -> int:
    """`run_fn(argv)` with every failure as one `error: ...` line on stderr; returns the exit status.

    User errors (SdsupError), unreadable files (OSError) and malformed JSON
    exit 1; Ctrl-C exits 130; anything else is a bug, still one line, with a
    pointer to SDSUP_DEBUG=1 for the traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get(DEBUG_VARIABLE):
        return run_fn(argv)
    try:
        return run_fn(argv)
    except SdsupError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: still one line, with a pointer to the traceback
        print(f"error: unexpected {type(e).__name__}: {one_line(e)} (set {DEBUG_VARIABLE}=1 for a traceback)",
              file=sys.stderr)
        return 1


def keep_tensorflow_off_accelerators() -> None:
    """TensorFlow (tfds, clu's writers) must never take a GPU from JAX."""
    import tensorflow as tf  # deferred: only the training entry points need TensorFlow configured

    tf.config.set_visible_devices([], "GPU")


def use_compilation_cache(config) -> None:
    """JAX's persistent compilation cache at `config.jax_cache_dir` (default ~/.cache/sdsup/jax)."""
    cache = config.get("jax_cache_dir") or os.path.expanduser("~/.cache/sdsup/jax")
    jax.config.update("jax_compilation_cache_dir", cache)
