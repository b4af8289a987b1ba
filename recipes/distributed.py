"""The recipe's process group: joining it, leaving it without a hang, and not outliving the launcher.

Two ways a multi-process run used to go wrong after its work was done, and what this module does:

- **Shutdown.** Tearing down a gloo process group can deadlock: its destructor waits for a gloo thread
  that waits for the Python lock the destructor holds. :func:`shutdown` leaves in an order that gives that
  thread nothing to wait for (every rank past a barrier, the DDP wrapper and its reducer released, then
  ``destroy_process_group``), and under a watchdog that needs no Python lock (``faulthandler``'s C
  thread): past ``SHUTDOWN_TIMEOUT_S`` the process prints where it stood and exits with status 1.
- **A dead launcher.** ``torchrun`` killed with SIGKILL cannot stop its workers. Each worker watches its
  parent process (:func:`exit_with_launcher`) and exits, status 1, once the launcher is gone; its
  checkpoints are whole (they are written atomically), so the run resumes from the newest one.

>>> SHUTDOWN_TIMEOUT_S >= 10
True
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import sys
import threading

import torch
import torch.distributed as dist

SHUTDOWN_TIMEOUT_S = 60  # leaving the group takes well under a second when nothing is wrong
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # a rank waiting this long on the others gives up
LAUNCHER_POLL_S = 1.0


def init(backend: str, device: torch.device | None) -> None:
    """Join the process group ``torchrun`` describes in the environment, and watch the launcher."""
    dist.init_process_group(backend, device_id=device, timeout=COLLECTIVE_TIMEOUT)
    exit_with_launcher()


def exit_with_launcher(poll_s: float = LAUNCHER_POLL_S) -> threading.Thread:
    """Start a daemon thread that ends this process (status 1) when its parent, the launcher, is gone.

    A process whose parent dies is handed to another parent (init, or a subreaper), so a changed
    ``os.getppid()`` means the launcher no longer supervises this worker. Returns the thread.
    """
    launcher = os.getppid()

    def watch() -> None:
        stopped = threading.Event()
        while not stopped.wait(poll_s):
            if os.getppid() != launcher:
                print(f"error: the launcher (pid {launcher}) is gone; worker {os.getpid()} stops. Checkpoints are "
                      f"whole: start the run again with --resume auto", file=sys.stderr, flush=True)
                os._exit(1)

    thread = threading.Thread(target=watch, name="lsparam-launcher-watch", daemon=True)
    thread.start()
    return thread


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Leave the process group, if this process is in one, within ``timeout_s`` seconds.

    Drop the references to the DDP-wrapped model and the optimizer first: their reducer's hooks and
    futures are collected here, before the group they point to is destroyed.
    """
    if not dist.is_initialized():
        return
    faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.stderr)
    try:
        gc.collect()
        try:
            dist.barrier()  # every rank is done with its collectives before any rank tears down
        except Exception:  # another rank failed first: leave anyway, the watchdog bounds what follows
            pass
        dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()
