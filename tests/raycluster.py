"""A real Ray cluster of `ray start --block` nodes on this machine, for tests: token auth (Ray 2.60's
default, RAY_AUTH_MODE=token with a token in a temp HOME), each node in its own temp dir and process
group, RAY_ADDRESS pinned so nothing joins another Ray instance, torn down without `ray stop`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """A child process and its descendants: a node's GCS, raylet, agents and Ray workers (which the
    raylet puts in process groups of their own, so killing the node's group alone would leave them)."""
    if proc.poll() is not None:  # reaped: its pid may already name another process
        return []
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _raylet_node_id(proc: subprocess.Popen) -> str:
    ids = []
    for p in _tree(proc):
        try:
            if p.name() == "raylet":
                ids += [a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_id=")]
        except psutil.Error:
            pass
    assert len(ids) == 1, f"{proc.args}: raylet node ids {ids}"
    return ids[0]


def stop_process_tree(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL what is left of it and of its descendants."""
    members = _tree(proc)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    _sigkill(proc, members)


def _sigkill(proc: subprocess.Popen, members: list[psutil.Process]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in members:
        try:
            p.kill()  # psutil checks the pid still names the same process
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _alive(members: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in members:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_for_line(path: Path, proc: subprocess.Popen, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{proc.args} did not print {text!r} in {timeout}s:\n{path.read_text()[-3000:]}")


class Cluster:
    """A head node and worker nodes, each `ray start --block` in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: socket paths must fit 107 bytes
        home = root / "home"  # the token lives in ~/.ray/auth_token: keep the user's untouched
        home.mkdir()
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ADDRESS": self.address,  # the job, and Ray's own clients in workers, reach this cluster only
                    "TOKRAY_CACHE_DIR": str(root / "cache"),
                    "RAY_health_check_period_ms": "1000",  # a dead raylet is noticed in ~5 s rather than ~15
                    "RAY_raylet_start_wait_time_s": "180",  # a loaded CI machine may take over a minute to start one
                    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",  # likewise for the Train workers (default 60)
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the controller polls workers 4x as often (default 2)
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        self._logs = []
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True,
                       timeout=60)

    def start(self, name: str, *args: str, cpus: int = 1) -> subprocess.Popen:
        """Start a node and wait until `ray start` reports it running (registered with the GCS)."""
        path = self.root / f"{name}.log"
        log = open(path, "w")
        self._logs.append(log)
        # the dashboard agent's port is fixed (52365) by default: any other Ray on the machine would hold it
        proc = subprocess.Popen([RAY, "start", "--block", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
                                 f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = proc
        _wait_for_line(path, proc, "Ray runtime started", timeout=240)
        self.node_ids[name] = _raylet_node_id(proc)[:8]  # as trace file names carry them
        return proc

    def start_head(self, dashboard_port: int = 0, cpus: int = 1) -> None:
        """The head (GCS); with ``dashboard_port`` also the dashboard and job server (`ray job submit`)."""
        ui = ([f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
              if dashboard_port else ["--include-dashboard=false"])
        self.start("head", "--head", f"--port={self.address.split(':')[1]}", *ui, f"--temp-dir={self.temp_dir}",
                   cpus=cpus)

    def add_worker(self, name: str, cpus: int = 1) -> subprocess.Popen:
        return self.start(name, f"--address={self.address}", cpus=cpus)

    def kill(self, name: str) -> None:
        """The node dies at once, as a machine would: SIGKILL to ray start, GCS/raylet, agents, Ray workers."""
        proc = self.nodes[name]
        members = _tree(proc)
        assert members, f"node {name} had already exited ({proc.returncode})"
        _sigkill(proc, members)
        deadline = time.time() + 10
        while (left := _alive(members)) and time.time() < deadline:
            time.sleep(0.1)
        assert not left, f"processes of node {name} survived SIGKILL: {left}"

    def close(self) -> None:
        for proc in reversed(list(self.nodes.values())):  # worker nodes first, the head (GCS) last
            stop_process_tree(proc)
        for log in self._logs:
            log.close()
        try:  # Ray's logs stay with the test's tmp_path, for a failure's post-mortem
            shutil.copytree(Path(self.temp_dir) / "session_latest" / "logs", self.root / "ray-logs",
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
        except OSError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
