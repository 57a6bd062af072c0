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
    Its workers are told the API server's address: their own lookup fails when a machine runs more than
    one Ray (it scans for local instances).
    """
    import ray

    from ray._private.services import canonicalize_bootstrap_address  # ray.init's own "is there a cluster" test

    if ray.is_initialized():
        return
    if not dashboard or canonicalize_bootstrap_address(None) is not None:  # joining: the cluster's dashboard serves
        ray.init(include_dashboard=False, configure_logging=False)  # (the flag only applies to a new Ray)
        return
    port = _free_port()
    ray.init(include_dashboard=True, dashboard_port=port, configure_logging=False,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
