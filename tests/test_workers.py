"""The pure decisions of ``serve --workers N`` (:mod:`gateway.workers`): what ``auto`` means,
when more than one worker is refused, what each worker's configuration is, the restart
backoff, and the ``--workers`` option itself.  The processes: tests/integration/test_workers.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import build_parser
from gateway.config import Config
from gateway.workers import (
    RESTART_BASE_SECONDS,
    RESTART_MAX_SECONDS,
    available_cpus,
    bind_reuseport,
    cgroup_cpu_limit,
    describe_exit,
    parse_workers,
    refusal,
    restart_delay,
    worker_config,
)
from tests.support.gateway import gateway_config


def _config(tmp_path: Path, **kwargs: Any) -> Config:
    return gateway_config("ws://127.0.0.1:9/v1/realtime", tmp_path / "key.json", **kwargs)


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({}, None),
    ({"cpu.max": "garbage"}, None),
])
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], limit: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_auto_is_the_cpus_this_process_may_use_bounded_by_its_cgroup_quota(
        tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no quota
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity + 8) * 100000} 100000\n")
    assert available_cpus(tmp_path) == affinity  # a quota above the CPUs changes nothing


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_parse_workers_refuses_what_is_not_a_count(value: str) -> None:
    with pytest.raises(ValueError, match="worker"):
        parse_workers(value)


def test_parse_workers() -> None:
    assert parse_workers("1") == 1
    assert parse_workers("4") == 4
    assert parse_workers("auto") == parse_workers("AUTO") == available_cpus()


def test_the_workers_option_defaults_to_one_and_refuses_zero_as_a_usage_error() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve"]).workers == 1
    assert parser.parse_args(["serve", "--workers", "3"]).workers == 3
    assert parser.parse_args(["serve", "--workers", "auto"]).workers == available_cpus()
    stderr = io.StringIO()
    with redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        parser.parse_args(["serve", "--workers", "0"])
    assert exited.value.code == 2
    assert "--workers: 0 workers: at least 1" in stderr.getvalue()
    assert "--worker-index" not in parser.format_help()  # the supervisor's, hidden


def test_more_than_one_worker_needs_redis(tmp_path: Path) -> None:
    alone = _config(tmp_path)
    assert refusal(alone, 1) is None
    message = refusal(alone, 2)
    assert message is not None and "\n" not in message
    assert "redis:" in message and "per process" in message
    assert refusal(_config(tmp_path, redis={"url": "redis://127.0.0.1:1/0"}), 8) is None


def test_each_worker_gets_its_share_of_the_per_replica_caps(tmp_path: Path) -> None:
    config = _config(tmp_path, server={"max_sessions": 1001,
                                       "max_unauthenticated_handshakes": 10},
                     redis={"url": "redis://127.0.0.1:1/0", "expected_replicas": 3})
    assert worker_config(config, 1) is config
    share = worker_config(config, 4)
    assert share.server.max_sessions == 251  # ceil(1001 / 4)
    assert share.server.max_unauthenticated_handshakes == 3
    assert share.redis is not None and share.redis.expected_replicas == 12
    # the rest is the same configuration, secrets included
    assert share.server.drain_seconds == config.server.drain_seconds
    assert share.upstreams["emulator"].api_key == config.upstreams["emulator"].api_key
    assert share.tenants == config.tenants


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == RESTART_BASE_SECONDS
    assert delays[1] == 2 * RESTART_BASE_SECONDS
    assert delays == sorted(delays) and delays[-1] == RESTART_MAX_SECONDS


def test_describe_exit() -> None:
    assert describe_exit(0) == "exit 0"
    assert describe_exit(1) == "exit 1"
    assert describe_exit(-9) == "signal SIGKILL"


def test_reuseport_sockets_share_a_port_others_cannot_take_it() -> None:
    first = bind_reuseport("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = bind_reuseport("127.0.0.1", port)
    try:
        plain = socket.socket()
        with pytest.raises(OSError, match="in use"):
            plain.bind(("127.0.0.1", port))
        plain.close()
    finally:
        first.close()
        second.close()


WORKER_LOGGING = """
import logging
from gateway.logs import configure_logging, get_logger
configure_logging("info", "json", fields={"worker": 3})
get_logger("gateway.test").info("session.start", subject="u")
logging.getLogger("uvicorn.error").info("Started server process [1]")
get_logger("gateway.test").info("own", worker="explicit")
"""


def test_every_line_of_a_worker_carries_its_index() -> None:
    # In a child interpreter: logging is process-wide, and this test must leave it alone.
    done = subprocess.run([sys.executable, "-c", WORKER_LOGGING], capture_output=True,
                          text=True, timeout=60, check=True)
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert [r["worker"] for r in records] == [3, 3, "explicit"]


def test_the_supervisor_does_not_load_the_session_pipeline() -> None:
    # Its memory is the pod's overhead: about 45 MiB rather than a gateway's 70.
    code = ("import sys, gateway.workers, gateway.cli; "
            "print(sorted(m for m in ('gateway.app', 'gateway.server', 'gateway.session', "
            "'gateway.relay') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "[]"
