"""What every command-line entry point shares: one-line errors, TensorFlow kept off the accelerator, the XLA cache.

A user's mistake (an `SdsupError`: a bad flag value, a missing file, a
workdir without the stage asked for; an unreadable path) is printed as one
line, `error: ...`, the last line on stderr, with a non-zero exit status and
no traceback; SDSUP_DEBUG=1 re-raises it instead. That holds for flag
parsing too: absl's and argparse's own messages (a usage block, then
"FATAL Flags parsing error" or "prog: error:") are replaced by that line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
from absl import app, flags

from sdsup import config_lib
from sdsup.errors import SdsupError

DEBUG_VARIABLE = "SDSUP_DEBUG"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run(main: Callable, define_flags: Callable, flags_parser: Optional[Callable] = None,
        argv: Optional[Sequence[str]] = None) -> None:
    """Defines the entry point's flags, then `absl.app.run`s `main(flags)` with user errors as one line.

    `define_flags()` returns the entry point's flag holders (any object);
    they are defined here, when the entry point runs, not when its module is
    imported: the CLIs share flag names (--workdir, --seed), so defining them
    at import time would make the modules impossible to import together.
    Positional arguments are refused. `flags_parser` defaults to
    `parse_flags` (flag mistakes as one line); `argv` (program name first)
    defaults to sys.argv. For the absl entry points: train, sample,
    evaluate, the ablation.
    """
    holders = define_flags()

    def guarded(argv):
        if len(argv) > 1:
            sys.exit(f"error: unexpected arguments {argv[1:]}: every option is a --flag=value")
        if os.environ.get(DEBUG_VARIABLE):
            return main(holders)
        try:
            return main(holders)
        except SdsupError as e:
            sys.exit(f"error: {one_line(e)}")
        except OSError as e:  # a path that cannot be read or written: the user's to fix, named by the message
            sys.exit(f"error: {type(e).__name__}: {one_line(e)}")

    app.run(guarded, argv=None if argv is None else list(argv), flags_parser=flags_parser or parse_flags)


HELP_FLAGS = frozenset({"--help", "-h", "-?", "--helpshort", "--helpfull"})


def parse_flags(argv: Sequence[str]):
    """absl's flag parser, with every mistake as one `error: ...` line (absl prints a usage block instead).

    A wrong value type, an unknown flag, a missing required flag; for an
    `ml_collections` `--config` flag also an unknown override key (naming
    the key, or where a renamed key went) and a config file that fails to
    load.
    """
    argv = list(argv)
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:
        # absl exits with status 1 after printing --help; asking for help is no failure.
        if e.code == 1 and HELP_FLAGS & set(argv):
            sys.exit(0)
        raise
    except flags.Error as e:  # a value of the wrong type, an unknown flag, a config file that fails to load
        sys.exit("error: " + without_traceback(str(e)))
    except (AttributeError, KeyError) as e:
        # config_flags fails with a bare AttributeError on an unknown override key (or a file without get_config).
        sys.exit(f"error: {unknown_config_override(argv) or 'cannot load the config: ' + one_line(e)}")
    except Exception as e:  # e.g. get_config(arg) rejecting its argument
        sys.exit(f"error: cannot load the config: {type(e).__name__}: {one_line(e)}")


def without_traceback(message: str) -> str:
    """`message` as one line, a traceback inside it (config_flags quotes one when get_config raises) cut down to
    its last line, the exception itself."""
    head, marker, trace = message.partition("Traceback (most recent call last)")
    if marker:
        lines = [line for line in trace.splitlines() if line.strip()]
        message = head + (lines[-1] if lines else "")
    return " ".join(message.split())


def unknown_config_override(argv: Sequence[str]) -> Optional[str]:
    """Which `--config.KEY=...` of `argv` names no key of the config (or a renamed one), as a message; or None."""
    for arg in argv[1:]:
        if arg.startswith("--config."):
            hint = config_lib.renamed_key_message(arg[len("--config."):].split("=", 1)[0])
            if hint:
                return hint
    config = _config_named_by(argv)
    if config is None:
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, walked = config, "config"
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                keys = sorted(node.keys()) if hasattr(node, "keys") else []
                return f"unknown config key {path!r} in {arg}: {walked} has no {part!r} (it has {keys})"
            node, walked = node[part], f"{walked}.{part}"
    return None


def _config_named_by(argv: Sequence[str]):
    """The config named by --config=FILE[:ARG], loaded without overrides; None if there is none or it fails."""
    spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not spec_arg:
        return None
    path, _, arg = spec_arg.partition(":")
    try:
        return config_lib.load(path, arg)
    except Exception:  # the caller reports the original failure
        return None


def loaded_config(holder):
    """The value of a `config_flags` holder; a config file that failed to load (raising on first use) -> SdsupError."""
    try:
        config = holder.value
        config.keys()  # a config file that failed to load raises on first use
    except Exception as e:
        raise SdsupError("cannot load the config: " + one_line(e)) from None
    return config


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its mistakes as one last `error: ...` line (argparse ends with "prog: error: ...")."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {one_line(message)}\n")


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
