"""Shared command-line plumbing for the thin entry points in jobs/.

Every job's ``main(argv)`` raises (for in-process callers and tests); run as a program it goes through :func:`run`,
which turns the outcome into the scheduler contract (README, "Exit codes and scheduler contract"):

====  ==========================================================================================================
code  meaning
====  ==========================================================================================================
0     success
1     any other failure (missing input, a failed Spark job, a bug, ...)
2     usage or configuration error: argparse errors, ``ConfigError`` (unknown ``--set`` key, bad value, no file)
3     data-quality gate: the ETL quarantined more than ``etl.max_quarantine_share`` (``QuarantineGateError``)
4     output refused: foreign directory or locked by another job (``OutputError``), or built from other inputs or
      config without ``--overwrite`` (``esmm.outputs.OutputRefused``)
====  ==========================================================================================================

A failure ends with one line on stderr, ``esmm-<job>: error: <message>``. The expected ones (codes 2-4) print
nothing else; a failure (code 1) prints its traceback first, and so does every failure with ``--log-level DEBUG``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

from esmm.config import Config, load_config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2            # argparse uses 2 as well
EXIT_DATA_QUALITY = 3
EXIT_OUTPUT_REFUSED = 4
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_prog: str | None = None  # the program name of the job :func:`run` runs (argparse's default otherwise)


def setup_logging(level: str = "INFO") -> None:
    # our loggers at ``level``; third-party ones (Horovod's driver logs every rendezvous key at INFO) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("esmm").setLevel(getattr(logging, level.upper()))
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # petastorm on pyarrow 14 uses the legacy ParquetDataset API: filter exactly those FutureWarnings.
    warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")
    warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_prog, description=description)
    p.add_argument("--conf", default=None, help="YAML config (default: built-in defaults = conf/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=4096 (repeatable)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="this project's log level (default INFO); DEBUG also prints the traceback of any failure")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, Config]:
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    return args, load_config(args.conf, args.overrides)


# ------------------------------------------------------------------------------------------------ exit codes

def release_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler's kill, a preemption) into ``SystemExit(143)`` in the main thread, so that every
    ``with`` block unwinds: output locks are released and unfinished staging is removed. A blocked signal mask is
    inherited across exec: a job started by a parent that blocks SIGTERM (a thread of a test runner or an agent)
    would never see it, so SIGTERM is unblocked here too."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def exit_code(error: BaseException) -> int:
    """The exit code of a job that raised ``error`` (module docstring)."""
    from esmm.config import ConfigError
    from esmm.outputs import OutputError, OutputRefused
    from esmm.storage import NotSharedError
    if isinstance(error, (ConfigError, NotSharedError)):
        return EXIT_USAGE
    if isinstance(error, (OutputError, OutputRefused)):
        return EXIT_OUTPUT_REFUSED
    etl = sys.modules.get("esmm.etl")  # not imported: the error cannot be the ETL's (and importing it starts pyspark)
    if etl is not None and isinstance(error, etl.QuarantineGateError):
        return EXIT_DATA_QUALITY
    return EXIT_FAILURE


def _ours(error: BaseException) -> bool:
    """One of the project's own errors (EtlError, TrainError, ...: their messages say what to do)."""
    return type(error).__module__.split(".")[0] == "esmm"


def one_line(error: BaseException) -> str:
    """The error's message on one line: the project's own messages whole, others' first line after their type
    (a Py4J error's first line is the call that failed; the traceback printed above it has the rest)."""
    lines = [x.strip() for x in str(error).strip().splitlines() if x.strip()]
    if _ours(error) and lines:
        return " ".join(lines)
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def job_name(main) -> str:
    """``esmm-<job>`` for a job's ``main`` (its file's name: jobs/etl.py -> esmm-etl, also under ``python -m``)."""
    path = getattr(sys.modules.get(main.__module__), "__file__", None)
    return "esmm-" + (os.path.splitext(os.path.basename(path))[0] if path else main.__module__.rsplit(".", 1)[-1])


def run(main, argv=None, name: str | None = None) -> int:
    """Run a job's ``main(argv)`` as a program; returns its exit code (``sys.exit(cli.run(main))``).

    Usage errors from argparse exit with 2 by themselves (usage line, then ``esmm-<job>: error: ...``); ``--help``
    with 0."""
    global _prog
    _prog = name = name or job_name(main)
    release_on_sigterm()
    try:
        main(argv)
    except Exception as e:  # noqa: BLE001  (KeyboardInterrupt and SystemExit pass through)
        code = exit_code(e)
        debug = logging.getLogger("esmm").isEnabledFor(logging.DEBUG)
        sys.stdout.flush()
        if debug or code == EXIT_FAILURE:
            traceback.print_exception(e, file=sys.stderr)
        print(f"{name}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return code
    finally:
        _prog = None
    return EXIT_OK
