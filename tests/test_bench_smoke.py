"""The benchmark (``python -m bench.run``) cannot rot: a smoke run plus its pure parts.

The smoke run is the real thing, scaled down: 4 sessions for 2 s against the direct
path, nginx (when installed) and the gateway with Redis admission, a dev-issuer token
and usage metering.  It checks that every session opened and stayed open, every append
came back, and the report's numbers are plausible for that load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile import (
    component_of,
    parse_collapsed,
    parse_perf_syscalls,
    summarise,
)
from bench.report import RelayRun, bar
from bench.run import update_readme

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SESSIONS = 4
RATE = 50
DURATION = 2.0


def _missing_tool() -> str | None:
    if shutil.which("node") is None:
        return "node (Node.js >= 18) is not installed; the load generator needs it"
    if not (BENCH / "node_modules" / "ws" / "package.json").exists():
        return "the load generator's ws package is missing: run `npm ci --prefix bench`"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


def _has_nginx() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def test_smoke_run_reports_sane_numbers(tmp_path: Path) -> None:
    reason = _missing_tool()
    if reason:
        pytest.skip(reason)
    relays = ["direct", *(["nginx"] if _has_nginx() else []), "gateway"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--sessions", str(SESSIONS), "--rate", str(RATE),
         "--duration", str(DURATION), "--warmup", "0.5", "--ramp", "0.2",
         "--relays", ",".join(relays), "--out", str(tmp_path), "--no-readme"],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = tmp_path.glob("*sessions.json")
    data = json.loads(result.read_text())
    offered = SESSIONS * RATE * DURATION
    assert set(data["runs"]) == set(relays)
    for name in relays:
        run = data["runs"][name]
        report, derived = run["loadgen"], run["derived"]
        assert report["sessions_opened"] == SESSIONS, name
        assert report["handshake_failures"] == {}, name
        assert report["unexpected_closes"] == {}, name
        assert report["bad_deltas"] == 0 and report["unanswered_appends"] == 0, name
        assert 0.8 * offered <= report["appends_in_window"] <= 1.2 * offered, name
        # appends one way, as many deltas (plus a usage event a second) the other way
        assert 0.8 * 2 * SESSIONS * RATE <= derived["messages_per_s"] <= 1.3 * 2 * SESSIONS * RATE
        assert 0 < derived["rtt_p50_ms"] <= derived["rtt_p99_ms"] < 1000, name
        assert 0 < derived["handshake_p50_ms"] < 5000, name
        if name == "direct":
            assert derived["cpu_us_per_message"] is None
            continue
        assert derived["cpu_us_per_message"] is not None and derived["cpu_us_per_message"] > 0
        assert run["rss_rest"] > 1024 * 1024 and run["rss_loaded"] > 0, name
        assert derived["added_p50_ms"] is not None, name
    gateway = data["runs"]["gateway"]["gateway_metrics"]
    assert gateway["tokens_total"] > 0  # usage events were metered
    # Live sessions are in the gauge (that it returns to 0 after the load is the soak's check).
    assert gateway["sessions_active_idle"] == SESSIONS
    assert {"auth", "admission", "upstream_connect", "total"} <= set(gateway["handshake_mean_ms"])
    assert gateway["messages_total"]["client_to_upstream"] >= offered * 0.8
    assert len(data["bar"]) == 5
    assert {v["verdict"] for v in data["bar"]} <= {"PASS", "FAIL", "n/a"}
    assert data["versions"]["gateway"] and data["machine"]["cores"]
    table = result.with_suffix(".md").read_text()
    assert "| gateway |" in table and "| criterion |" in table


def _run(name: str, *, cpu: float | None, p99: float, handshake: float,
         rss_rest: int | None = None, rss_loaded: int | None = None) -> RelayRun:
    loadgen = {"appends_in_window": 500_000, "received_in_window": 500_000,
               "rtt_ms": {"p50": p99 / 2, "p99": p99}, "handshake_ms": {"p50": handshake}}
    return RelayRun(name, 200, loadgen, wall_seconds=20.0, cpu_seconds=cpu,
                    rss_rest=rss_rest, rss_loaded=rss_loaded)


def test_bar_verdicts() -> None:
    runs = {
        "direct": _run("direct", cpu=None, p99=1.0, handshake=1.0),
        "nginx": _run("nginx", cpu=10.0, p99=1.5, handshake=1.5, rss_rest=1, rss_loaded=1),
        # 16 us/msg = 1.6 x nginx's 10 us: FAIL; p99 +1.5 ms: PASS; 20 KiB/session: PASS;
        # 50 MiB at rest: PASS; handshake 4.5 ms > 1 + 3: FAIL
        "gateway": _run("gateway", cpu=16.0, p99=2.5, handshake=4.5, rss_rest=50 * 2**20,
                        rss_loaded=50 * 2**20 + 200 * 20 * 1024),
    }
    verdicts = [v.passed for v in bar(runs)]
    assert verdicts == [False, True, True, True, False]
    del runs["nginx"]
    assert bar(runs)[0].passed is None  # no reference, no verdict


def test_profile_summary_drops_idle_samples_and_attributes_components() -> None:
    lines = [
        "run (asyncio/runners.py:118);_client_to_upstream (gateway/relay.py:139);"
        "send (site-packages/websockets/asyncio/connection.py:484) 6",
        "run (asyncio/runners.py:118);uv_run (core.c:464);uv__io_poll (linux.c:1452);"
        "epoll_pwait (libc.so.6) 50",
        "_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:81) 30",
        "run (asyncio/runners.py:118);send (uvicorn/protocols/websockets/x.py:1);"
        "write (loop.c:10);write (libc.so.6) 4",
    ]
    stacks = parse_collapsed(lines)
    summary = summarise(stacks)
    assert summary.samples == 10 and summary.idle_samples == 80
    shares = dict(summary.components)
    assert shares["websockets asyncio client (upstream side)"] == pytest.approx(0.6)
    assert shares["uvloop / libuv (event loop, socket I/O)"] == pytest.approx(0.4)
    assert dict(summary.syscalls)["write"] == pytest.approx(0.4)
    assert component_of(stacks[0][0]) == "websockets asyncio client (upstream side)"


def test_perf_syscalls_take_the_kernel_entry_points() -> None:
    text = ("    35.86%     0.00%  [k] do_syscall_64\n"
            "    21.38%     0.00%  [k] ksys_write\n"
            "     5.59%     0.00%  [k] __x64_sys_epoll_pwait\n"
            "    22.10%    22.10%  [.] _PyEval_EvalFrameDefault\n")
    rows = parse_perf_syscalls(text)
    assert [name for name, _ in rows] == ["all system calls", "write", "epoll_pwait"]
    assert [share for _, share in rows] == pytest.approx([0.3586, 0.2138, 0.0559])


def test_readme_block_is_replaced_in_place(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Bench\n\n<!-- bench:x:start -->\nold\n<!-- bench:x:end -->\n\ntail\n")
    update_readme(readme, "x", "new table")
    update_readme(readme, "y", "other")
    text = readme.read_text()
    assert "old" not in text and "new table" in text and text.index("tail") < text.index("other")
    assert text.count("<!-- bench:x:start -->") == 1
