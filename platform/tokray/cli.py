"""Shared plumbing for the thin entry points in jobs/: user errors, tables, result lines.

Logging setup and joining Ray are process setup, used below the jobs too: ``tokray.runtime``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

# FloatingPointError: a non-finite loss, reported with its step
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ConnectionError, KeyError, FloatingPointError)


def parse_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse a job's flags and set the process up: logging (``--verbose`` if the job has it) and torch's CPU
    threads (``--threads`` if the job has it; 0 = torch's default)."""
    from tokray.runtime import setup_logging

    args = p.parse_args()
    setup_logging(getattr(args, "verbose", False))
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    return args


def run_main(main: Callable[[], int | None]) -> None:
    """Run a job; a user error ends it with one clear line on stderr and exit code 2."""
    try:
        code = main()
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    _exit(code or 0)


def _exit(code: int) -> None:
    """End the process once its work is done and reported, without C++ static destructors: Arrow's
    Parquet thread pools can abort a finished process at interpreter teardown ("terminate called
    without an active exception", exit 134; apache/arrow#34314). Ray and logging are shut down first."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain aligned text table (what a person reads); the JSON line is for scripts."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_result(obj: dict) -> int:
    """The job's last line: one JSON object with its figures. Returns 0, the job's exit code, so a job ends
    with ``return print_result(...)``. A Ray this process started is shut down first: its log monitor forwards
    worker and raylet lines to stdout at any time, and one landing after the JSON line breaks it as the last."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    print(json.dumps(obj, sort_keys=True), flush=True)
    return 0

