"""``serve --workers N`` as real processes: a supervisor and its workers on one port, a real
``redis-server``, the emulator, all on loopback with free ports.

Where a connection lands is the kernel's choice (``SO_REUSEPORT``); the tests see it from
``/proc`` (:mod:`tests.support.workers`) and place connections on the worker they need.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.emulator.server import Emulator
from gateway.workers import available_cpus
from tests.ops.promql import promtool_path, run_promtool
from tests.support.gateway import UPSTREAM_KEY, UPSTREAM_KEY_ENV, gateway_config, mint, wait_for
from tests.support.process import GatewayProcess, gateway_process, write_config
from tests.support.redis_server import RedisServer
from tests.support.workers import (
    http_request,
    metric,
    socket_on_worker,
    worker_pids,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SO_REUSEPORT balancing and /proc are Linux's")


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _config(emulator: Emulator, key_file: Path, tmp_path: Path, redis: RedisServer | None,
            **kwargs: Any) -> Path:
    config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                            redis={"url": redis.url} if redis is not None else None, **kwargs)
    mint(key_file)  # the test issuer's key exists before the workers read it
    return write_config(config, tmp_path / "gateway.yaml")


@pytest.fixture
async def workers(emulator: Emulator, key_file: Path, tmp_path: Path,
                  redis: RedisServer) -> AsyncIterator[GatewayProcess]:
    """Two workers, Redis, a 2 s drain, a tenant cap of 3 live sessions."""
    config = _config(emulator, key_file, tmp_path, redis, server={"drain_seconds": 2},
                     limits={"max_sessions": 3})
    async with gateway_process(config, "--workers", "2") as gw:
        yield gw


async def _session(gw: GatewayProcess, key_file: Path, pid: int, sub: str) -> ClientConnection:
    """A session opened on the worker whose pid is ``pid`` (its ``session.created`` read)."""
    sock = await socket_on_worker(gw.port, pid, worker_pids(gw).values())
    ws = await connect(gw.url(), sock=sock,
                       additional_headers={"Authorization": f"Bearer {mint(key_file, sub=sub)}"})
    assert json.loads(await ws.recv())["type"] == "session.created"
    return ws


async def _scrape(gw: GatewayProcess) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{gw.metrics_port}/metrics")
    assert response.status_code == 200
    return response.text


def _starts(gw: GatewayProcess) -> dict[str, int]:
    """Subject → the worker index its ``session.start`` line carries."""
    return {e["subject"]: e["worker"] for e in gw.events("session.start")}


async def _close_code(ws: ClientConnection, within: float) -> tuple[int, dict[str, Any] | None]:
    """Read until the gateway closes ``ws``; its close code and the last event."""
    last = None
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(within):
            while True:
                last = json.loads(await ws.recv())
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, last


async def test_sessions_land_on_every_worker_and_metrics_sum_exactly(
        workers: GatewayProcess, key_file: Path) -> None:
    gw = workers
    # Clients connecting as they like are spread by the kernel over both workers.
    subjects = [f"spread-{i}" for i in range(40)]
    for sub in subjects:
        async with connect(gw.url(), additional_headers={
                "Authorization": f"Bearer {mint(key_file, sub=sub)}"}) as ws:
            await ws.recv()
        await wait_for(lambda sub=sub: sub in _starts(gw), 5)
        if len(set(_starts(gw).values())) == 2:
            break
    assert set(_starts(gw).values()) == {0, 1}
    spread = len(_starts(gw))
    await wait_for(lambda: len(gw.events("session.end")) == spread, 5)

    pids = worker_pids(gw)
    live = [await _session(gw, key_file, pids[0], "live-a"),
            await _session(gw, key_file, pids[0], "live-b"),
            await _session(gw, key_file, pids[1], "live-c")]
    await wait_for(lambda: {s: w for s, w in _starts(gw).items() if s.startswith("live")} == {
        "live-a": 0, "live-b": 0, "live-c": 1}, 5)
    text = await _scrape(gw)
    assert metric(text, "realtime_gateway_sessions_active") == 3
    assert metric(text, "realtime_gateway_protocol_sessions_active", protocol="ga") == 3
    assert metric(text, "realtime_gateway_sessions_total") == spread
    assert metric(text, "realtime_gateway_session_duration_seconds_count") == spread
    assert metric(text, "realtime_gateway_handshake_duration_seconds_count",
                  phase="total") == spread + 3
    assert metric(text, "realtime_gateway_tenant_max_sessions", tenant="acme") == 3  # not 6
    assert metric(text, "realtime_gateway_build_info") == 1
    assert metric(text, "realtime_gateway_draining") == 0
    assert metric(text, "realtime_gateway_workers") == 2
    for worker in ("0", "1", "supervisor"):
        assert metric(text, "process_resident_memory_bytes", worker=worker) > 0
    for ws in live:
        await ws.close()
    await wait_for(lambda: len(gw.events("session.end")) == spread + 3, 5)
    text = await _scrape(gw)
    assert metric(text, "realtime_gateway_sessions_active") == 0
    assert metric(text, "realtime_gateway_sessions_total", outcome="ok") == spread + 3
    assert metric(text, "realtime_gateway_closes_total", initiator="client") == spread + 3
    if promtool_path() is not None:
        checked = run_promtool("check", "metrics", stdin=text)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    # Every line of a worker says which; none carries a token.
    lines = [json.loads(line) for line in gw.lines if line.startswith("{")]
    assert {r["worker"] for r in lines if r.get("event") == "worker.listening"} == {0, 1}
    assert all("worker" in r for r in lines if r.get("event") == "session.start")
    assert "eyJ" not in "\n".join(gw.lines)


async def test_a_concurrency_limit_holds_exactly_across_workers(
        workers: GatewayProcess, key_file: Path) -> None:
    gw = workers
    pids = worker_pids(gw)
    held = [await _session(gw, key_file, pids[0], "cap-0"),
            await _session(gw, key_file, pids[1], "cap-1"),
            await _session(gw, key_file, pids[1], "cap-2")]  # the tenant's cap: 3
    for index in (0, 1, 0, 1):  # the 4th session is refused on either worker
        sock = await socket_on_worker(gw.port, pids[index], pids.values())
        with pytest.raises(InvalidStatus) as refused:
            await connect(gw.url(), sock=sock, additional_headers={
                "Authorization": f"Bearer {mint(key_file, sub=f'over-{index}')}"})
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body or b"{}")["error"]["code"] == "rate_limited"
    await wait_for(lambda: sorted(e["worker"] for e in gw.events("session.rejected"))
                   == [0, 0, 1, 1], 5)
    await held[1].close()  # a slot freed on worker 1 is usable from worker 0
    await wait_for(lambda: gw.events("session.end"), 5)
    again = await _session(gw, key_file, pids[0], "cap-3")
    text = await _scrape(gw)
    assert metric(text, "realtime_gateway_session_rejections_total", code="rate_limited") == 4
    assert metric(text, "realtime_gateway_sessions_active") == 3
    for ws in [held[0], held[2], again]:
        await ws.close()


async def test_sigterm_drains_every_worker_then_the_supervisor_exits_0(
        workers: GatewayProcess, key_file: Path) -> None:
    gw = workers
    pids = worker_pids(gw)
    sessions = [await _session(gw, key_file, pids[0], "drain-0"),
                await _session(gw, key_file, pids[1], "drain-1")]
    loop = asyncio.get_running_loop()
    gw.process.send_signal(signal.SIGTERM)
    signalled = loop.time()
    await wait_for(lambda: {e["worker"] for e in gw.events("gateway.draining")} == {0, 1}, 5)
    for index in (0, 1):  # every worker: not ready, alive, refusing new sessions
        ready = await http_request(await socket_on_worker(gw.port, pids[index], pids.values()),
                                   "GET", "/readyz")
        assert ready[0] == 503 and ready[2]["checks"]["draining"] is True
        health = await http_request(await socket_on_worker(gw.port, pids[index], pids.values()),
                                    "GET", "/healthz")
        assert health[0] == 200
        sock = await socket_on_worker(gw.port, pids[index], pids.values())
        with pytest.raises(InvalidStatus) as refused:
            await connect(gw.url(), sock=sock, additional_headers={
                "Authorization": f"Bearer {mint(key_file, sub=f'late-{index}')}"})
        assert refused.value.response.status_code == 503
    # live sessions still relay during the drain, then close 1012
    for ws in sessions:
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
        assert json.loads(await ws.recv())["type"] == "session.updated"
    for ws in sessions:
        code, last = await _close_code(ws, within=10)
        assert code == 1012 and last is not None and last["error"]["code"] == "shutting_down"
    assert 2 - 0.5 <= loop.time() - signalled <= 2 + 4
    async with asyncio.timeout(20):
        assert await gw.process.wait() == 0
    await wait_for(lambda: gw.events("workers.stopped"), 5)
    assert [e["status"] for e in gw.events("worker.stopped")] == ["exit 0", "exit 0"]
    assert not gw.events("worker.restarting")
    [starting] = gw.events("workers.starting")  # its metric files and config copy are gone
    assert starting["directory"]
    assert not await asyncio.to_thread(Path(starting["directory"]).exists)


async def test_a_second_signal_cuts_every_drain_short(
        emulator: Emulator, key_file: Path, tmp_path: Path, redis: RedisServer) -> None:
    config = _config(emulator, key_file, tmp_path, redis, server={"drain_seconds": 120})
    async with gateway_process(config, "--workers", "2") as gw:
        pids = worker_pids(gw)
        sessions = [await _session(gw, key_file, pids[0], "short-0"),
                    await _session(gw, key_file, pids[1], "short-1")]
        gw.process.send_signal(signal.SIGINT)
        await wait_for(lambda: {e["worker"] for e in gw.events("gateway.draining")} == {0, 1}, 5)
        gw.process.send_signal(signal.SIGINT)
        for ws in sessions:
            code, _ = await _close_code(ws, within=10)
            assert code == 1012
        async with asyncio.timeout(20):
            assert await gw.process.wait() == 0
        await wait_for(lambda: gw.events("workers.drain_cut_short"), 5)


async def test_more_than_one_worker_without_redis_is_refused_at_start(
        emulator: Emulator, key_file: Path, tmp_path: Path) -> None:
    config = _config(emulator, key_file, tmp_path, None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 1
    assert out == b""
    message = err.decode().strip()
    assert "\n" not in message
    assert "redis" in message and "per process" in message and "--workers 1" in message


async def test_a_port_held_by_another_program_is_refused_at_start(
        emulator: Emulator, key_file: Path, tmp_path: Path, redis: RedisServer) -> None:
    config = _config(emulator, key_file, tmp_path, redis)
    with socket.socket() as taken:  # no SO_REUSEPORT: the port is not the gateway's to share
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2",
            "--port", str(taken.getsockname()[1]), "--metrics-port", "0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, UPSTREAM_KEY_ENV: UPSTREAM_KEY})
        async with asyncio.timeout(30):
            out, _ = await process.communicate()
    assert process.returncode == 1
    events = [json.loads(line)["event"] for line in out.decode().splitlines()
              if line.startswith("{")]
    assert events == ["workers.bind_failed"]  # before any worker or metrics server


async def test_auto_runs_one_worker_per_available_cpu(
        emulator: Emulator, key_file: Path, tmp_path: Path, redis: RedisServer) -> None:
    config = _config(emulator, key_file, tmp_path, redis, server={"drain_seconds": 0})
    async with gateway_process(config, "--workers", "auto") as gw:
        expected = available_cpus()
        # one CPU: auto is one worker, i.e. the single process (no supervisor)
        assert gw.events("gateway.listening")[0].get("workers", 1) == expected
        assert sorted(worker_pids(gw)) == (list(range(expected)) if expected > 1 else [])
        gw.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await gw.process.wait() == 0


async def test_a_crashed_worker_is_restarted(workers: GatewayProcess, key_file: Path) -> None:
    gw = workers
    pids = worker_pids(gw)
    doomed = await _session(gw, key_file, pids[0], "crash-0")
    survivor = await _session(gw, key_file, pids[1], "crash-1")
    os.kill(pids[0], signal.SIGKILL)
    await wait_for(lambda: worker_pids(gw)[0] != pids[0], 10)
    [exited] = gw.events("worker.exited")
    assert (exited["worker"], exited["pid"], exited["status"]) == (0, pids[0], "signal SIGKILL")
    assert gw.events("worker.restarting")[0]["worker"] == 0
    reborn = worker_pids(gw)[0]
    await wait_for(lambda: any(e["pid"] == reborn for e in gw.events("worker.listening")), 10)
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5):
            await doomed.recv()
    text = await _scrape(gw)
    assert metric(text, "realtime_gateway_sessions_active") == 1  # the dead worker's are gone
    assert metric(text, "realtime_gateway_worker_restarts_total") == 1
    assert metric(text, "realtime_gateway_workers") == 2
    fresh = await _session(gw, key_file, reborn, "crash-2")  # the new worker serves
    await fresh.close()
    await survivor.close()


def _gone(pid: int) -> bool:
    """The process has exited (no longer in /proc, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_workers_do_not_outlive_a_killed_supervisor(
        workers: GatewayProcess, key_file: Path) -> None:
    gw = workers
    pids = worker_pids(gw)
    [starting] = gw.events("workers.starting")
    gw.process.kill()  # no drain forwarded: the kernel tells the workers (PR_SET_PDEATHSIG)
    try:
        await wait_for(lambda: all(_gone(pid) for pid in pids.values()), 10)
    finally:
        for pid in pids.values():  # never leave a worker behind, whatever failed
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(shutil.rmtree, starting["directory"], True)


@pytest.mark.slow  # three failed starts with backoff: about 6 s
async def test_workers_that_keep_failing_to_start_make_the_supervisor_exit_1(
        emulator: Emulator, key_file: Path, tmp_path: Path, redis: RedisServer) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    config = _config(emulator, key_file, tmp_path, redis,
                     server={"tls_cert_file": str(bad), "tls_key_file": str(bad)})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2",
        "--port", "0", "--metrics-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert process.returncode == 1
    records = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert "workers.giving_up" in events and "gateway.listening" not in events
    assert events.count("worker.started") >= 3


async def test_a_hangup_reaching_another_worker_ends_the_call(
        key_file: Path, tmp_path: Path, redis: RedisServer) -> None:
    webrtc = pytest.importorskip("tests.support.webrtc")
    async with Emulator(api_key=UPSTREAM_KEY, webrtc=True, loopback_ice=True) as emulator:
        config = gateway_config(f"{emulator.url}/v1/realtime", key_file,
                                redis={"url": redis.url}, server={"drain_seconds": 0})
        upstream = config.upstreams["emulator"].model_copy(
            update={"calls_url": emulator.calls_url})
        config = config.model_copy(update={"upstreams": {"emulator": upstream}})
        token = mint(key_file, sub="caller")
        async with gateway_process(write_config(config, tmp_path / "gateway.yaml"),
                                   "--workers", "2") as gw:
            caller = webrtc.Caller(b"")
            async with httpx.AsyncClient(timeout=20) as http:
                answer = await http.post(
                    f"http://127.0.0.1:{gw.port}/v1/realtime/calls",
                    content=(await caller.offer()).encode(),
                    headers={"Authorization": f"Bearer {token}",
                             "Content-Type": "application/sdp"})
            assert answer.status_code == 201, answer.text
            call_id = answer.headers["location"].rsplit("/", 1)[1]
            await wait_for(lambda: emulator.calls() and emulator.calls()[0].sidebands == 1, 10)
            await wait_for(lambda: [e for e in gw.events("session.start")
                                    if e.get("call_id") == call_id], 5)
            [start] = [e for e in gw.events("session.start") if e.get("call_id") == call_id]
            pids = worker_pids(gw)
            other = pids[1 - start["worker"]]  # the worker that does not hold the call
            path = f"/v1/realtime/calls/{call_id}/hangup"
            stranger = await http_request(
                await socket_on_worker(gw.port, other, pids.values()), "POST", path,
                {"Authorization": f"Bearer {mint(key_file, sub='stranger')}"})
            assert stranger[0] == 404
            hangup = await http_request(
                await socket_on_worker(gw.port, other, pids.values()), "POST", path,
                {"Authorization": f"Bearer {token}"})
            assert hangup[0] == 200
            # The worker holding the call sees it end, releases it, counts the caller's hang-up.
            await wait_for(lambda: [e for e in gw.events("call.hangup")
                                    if e["worker"] == start["worker"]], 10)
            [held] = [e for e in gw.events("call.hangup") if e["worker"] == start["worker"]]
            assert held["cause"] == "client_hangup"
            assert emulator.calls()[0].hangups == 1
            async def ended() -> bool:  # session.end (after call.hangup) has been accounted
                return metric(await _scrape(gw), "realtime_gateway_sessions_total") == 1
            await wait_for(ended, 5)
            text = await _scrape(gw)
            assert metric(text, "realtime_gateway_call_hangups_total",
                          cause="client_hangup") == 1
            assert metric(text, "realtime_gateway_call_hangups_total") == 1
            assert metric(text, "realtime_gateway_sessions_active") == 0
            await caller.close()
