"""Private network namespaces for tests that must only ever touch loopback (WebRTC/ICE).

``unshare -n`` gives a process a network namespace of its own in which only ``lo`` exists
(brought up here): whatever addresses ICE gathers or checks inside it, they are loopback.
CI runs as root; elsewhere the tests skip with the reason.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest


def namespace_prefix_or_skip() -> list[str]:
    """The command prefix that runs a program (``[*prefix, program, *args]``) in a fresh
    network namespace with ``lo`` up; skips the test when that is not possible here."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("needs unshare (util-linux) and ip (iproute2) for a private network "
                    "namespace")
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"],
                           capture_output=True, check=False, timeout=10)
    if probe.returncode != 0:
        pytest.skip("unshare -n is not permitted here (run as root, as CI does): "
                    + probe.stderr.decode(errors="replace").strip())
    return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"']
