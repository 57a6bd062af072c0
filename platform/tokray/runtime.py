"""Process setup shared by jobs, Ray Train workers and Tune trials: logging, and joining Ray."""

from __future__ import annotations

import logging

# third-party loggers that speak per request at INFO
QUIET_LOGGERS = ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(dashboard: bool = False) -> None:
    """Join RAY_ADDRESS or the cluster `ray start` left on this machine; else start a local Ray for this job.

    Not ``address="auto"``: that also joins any other job's private local Ray found among the processes.
    ``dashboard``: a new local Ray runs its dashboard, whose State API Ray Train's placement-group cleaner
    needs: without it, every Train run whose controller is killed (a Tune trial stopped by ASHA or at
    its last report) keeps its workers' CPUs reserved until the driver exits, and a long search stalls.
    """
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=dashboard, configure_logging=False)  # (the flag only applies to a new Ray)
