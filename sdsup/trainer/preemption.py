"""Preemption: SIGTERM (a spot VM's or a scheduler's notice) ends a run with a usable checkpoint and status 75.

RETRY_EXIT_STATUS is 75, EX_TEMPFAIL of sysexits.h ("a temporary failure;
the user is invited to retry"): distinct from 1 (an error that a retry
repeats), from 128 + n (killed by signal n, which says nothing about what
was saved) and from 0 (finished). launch/local_multiprocess.sh runs the
command again on 75; other job systems can be told to (docs/reliability.md).

Single-process runs (`sdsup.train` calls `exit_on_sigterm` first thing):
- inside a training loop (`deferred`), SIGTERM only sets a flag: the loop
  finishes its step, saves a checkpoint (after any save in flight), waits for
  it and raises Preempted; the CLI exits 75.
- anywhere else (building the dataset, compiling, writing model files,
  evaluating) nothing is being checkpointed, and a stage's outputs count
  only once its DONE.json is written (atomically, last), so the process
  exits 75 at once; the stage runs again (from its final checkpoint, if
  its loop had finished). A
  watcher thread does that, woken through `signal.set_wakeup_fd`: a Python
  signal handler would only run once the main thread came back from a
  compile, minutes at scale, longer than a preemption notice's grace.

Multi-process runs: JAX's distributed runtime owns SIGTERM (its preemption
notifier replaces this handler at `jax.distributed.initialize`), and the
loop asks it each step (`reached_preemption`) so that every process saves
at the same step. Outside a loop SIGTERM is then ignored until the next
loop's first step (docs/reliability.md).

Library use without the CLI (tests, notebooks): `deferred` installs a
handler for the loop's duration only and restores the previous one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

import jax
from absl import logging

RETRY_EXIT_STATUS = 75


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved (or nothing was in progress) and the run should exit for a retry."""


class _Controller:
    """Process-wide SIGTERM state: whether the CLI's watcher is installed, whether a loop is running."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cli_installed = False
        self.loops = 0  # training loops running (deferring SIGTERM)
        self.requested = threading.Event()


_CONTROLLER = _Controller()


def exit_on_sigterm() -> None:
    """The CLI's SIGTERM policy for this process (see the module docstring); call from the main thread."""
    if _CONTROLLER.cli_installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C-level handler must never block
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the watcher acts; this only stops the default kill
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="sdsup SIGTERM watcher", daemon=True).start()
    _CONTROLLER.cli_installed = True


def _watch(read_fd: int) -> None:
    while True:
        received = os.read(read_fd, 64)  # one byte per signal, its number; other signals' bytes are ignored
        if signal.SIGTERM in received:
            _on_sigterm()


def _on_sigterm() -> None:
    with _CONTROLLER.lock:
        if _CONTROLLER.loops:
            if not _CONTROLLER.requested.is_set():
                logging.warning("SIGTERM received: the training loop saves a checkpoint after this step and stops")
            _CONTROLLER.requested.set()
            return
    message = (f"preempted: SIGTERM while no checkpoint was being written; exit status {RETRY_EXIT_STATUS} (retry: "
               "run the same command again to resume)")
    logging.warning(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(RETRY_EXIT_STATUS)


class deferred:
    """Context of a training loop: SIGTERM sets `.raised` instead of ending the process.

    With the CLI's policy installed, leaving the context with `.raised` set
    and no exception raises Preempted (SIGTERM came after the loop's last
    check, while its final checkpoint was being completed).
    """

    def __init__(self):
        self._mode: Optional[str] = None
        self._previous = None
        self._flag = threading.Event()

    @property
    def raised(self) -> bool:
        if self._mode == "cli":
            return _CONTROLLER.requested.is_set()
        return self._flag.is_set()

    def __enter__(self) -> "deferred":
        if jax.process_count() > 1:
            self._mode = "distributed"  # JAX's preemption notifier; the loop asks reached_preemption
        elif _CONTROLLER.cli_installed:
            self._mode = "cli"
            with _CONTROLLER.lock:
                _CONTROLLER.loops += 1
        elif threading.current_thread() is threading.main_thread():
            self._mode = "library"
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._flag.set()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._mode == "library":
            signal.signal(signal.SIGTERM, self._previous)
        elif self._mode == "cli":
            with _CONTROLLER.lock:
                _CONTROLLER.loops -= 1
            if exc_type is None and _CONTROLLER.requested.is_set():
                raise Preempted("SIGTERM arrived as the loop finished; its last checkpoint is complete")


@contextlib.contextmanager
def retry_status_on_preemption():
    """Turns Preempted into one line on stderr and exit status RETRY_EXIT_STATUS (the CLIs' policy)."""
    try:
        yield
    except Preempted as e:
        print(f"preempted: {e}; exit status {RETRY_EXIT_STATUS} (retry: run the same command again to resume)",
              file=sys.stderr, flush=True)
        sys.exit(RETRY_EXIT_STATUS)
