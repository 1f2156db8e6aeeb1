"""Failing fast: a rank that fails ends its process at once with a one-line message naming the
rank, so the launcher sees the exit and takes the other ranks down instead of leaving them
blocked in a collective."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

from dwnet.distributed.discovery import DistError
from dwnet.distributed.process_group import get_env
from dwnet.distributed.watchdog import stop_peer_watchdog
from dwnet.errors import UserError, debug_tracebacks

# printed as one line without a traceback (ConfigError, PreflightError, DataError are UserErrors)
ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (DistError, UserError)


def _who() -> str:
    env = get_env()
    if env is not None:
        return f"rank {env.rank}/{env.world_size} on {socket.gethostname()} (pid {os.getpid()})"
    r = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") \
        or os.environ.get("SLURM_PROCID") or "0"
    w = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") \
        or os.environ.get("SLURM_NTASKS") or "1"
    return f"rank {r}/{w} on {socket.gethostname()} (pid {os.getpid()})"


def run_and_exit_on_failure(main_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs main_fn(*args, **kwargs); on any exception logs it with this rank's identity and
    ends the process at once with os._exit(1) (130 on Ctrl-C, the code of a non-zero sys.exit):
    no atexit hooks, no process-group destructor, nothing that could block on a collective whose
    peer is gone. The launcher then sees a non-zero exit and takes the other ranks down.
    Returns main_fn's result on success."""
    try:
        return main_fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            print(f"[dwnet {_who()}] {exc.code}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"[dwnet {_who()}] interrupted", file=sys.stderr)
        code = 130
    except BaseException as exc:  # noqa: BLE001 - every failure must end the process
        if isinstance(exc, ONE_LINE_ERRORS):
            if debug_tracebacks():
                traceback.print_exc(file=sys.stderr)
            print(f"[dwnet {_who()}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            traceback.print_exc(file=sys.stderr)
            print(f"[dwnet {_who()}] FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr)
        code = 1
    exit_now(code)


def exit_now(code: int | None) -> None:
    """Flushes stdout/stderr and ends the process with `code` without the interpreter's teardown.

    The entry points end this way on success too: every file a run writes is closed (and fsynced)
    when it is written, while the teardown runs C++ destructors (gloo pairs, DeepSpeed's
    shared-memory all-reduce, ffcv's threads) that can abort with SIGABRT once a peer rank has
    already exited, turning a finished run into exit code -6. A finished MPI rank still calls
    MPI_Finalize (a collective every finished rank reaches): mpirun counts a rank that exits
    without it as failed. A failed rank does not, as its peers may never get there."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if not code:
            stop_peer_watchdog()  # a finished rank's silence is not a lost peer
            _finalize_mpi()
    finally:
        os._exit(code or 0)


def _finalize_mpi() -> None:
    mpi = sys.modules.get("mpi4py.MPI")  # imported only by the OpenMPI/PMI discovery
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
