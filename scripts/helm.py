"""Offline ``helm template`` / ``helm lint`` over helm-python-sdk (Helm v4 Go SDK, no binary).

Usage::

    python scripts/helm.py lint charts/realtime-gateway [-f FILE]... [--set K=V]... [--strict]
    python scripts/helm.py template charts/realtime-gateway [-f FILE]... [--set K=V]...
        [--name RELEASE] [-n NAMESPACE]

Values are deep-merged from each ``-f`` file in order, then from each ``--set`` (Helm's
``--set`` syntax).  ``lint`` prints ``SEVERITY PATH ERROR`` lines and exits 1 on an error, or
with ``--strict`` on a warning too.  ``template`` prints every non-empty rendered template
except NOTES.txt, sorted by path, each under ``---`` and ``# Source: <path>``, and exits 1 when
rendering fails (schema violation, template error, ``fail``).  A real ``helm`` binary takes
the same arguments, so this script can be swapped for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (maps merge, everything else replaces)."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            merged[key] = merge_values(current, value)
        else:
            merged[key] = value
    return merged


def main(argv: list[str] | None = None) -> int:
    """Run ``template`` or ``lint``; returns the process exit status (0 ok, 1 failure)."""
    import helm_python as helm  # imported late: ``--help`` works without the ops extra

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["template", "lint"])
    parser.add_argument("chart", type=Path)
    parser.add_argument("-f", "--values", action="append", default=[], type=Path)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--name", default="release-name")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    for path in args.values:
        values = merge_values(values, helm.values_from_yaml(path.read_text(encoding="utf-8")))
    for expression in args.sets:
        values = merge_values(values, helm.parse_set_string(expression))

    if args.command == "lint":
        report = helm.lint(args.chart, values or None, strict=args.strict,
                           namespace=args.namespace)
        threshold = 2 if args.strict else 3
        failed = bool(report.get("errors"))
        shown: set[str] = set()
        for message in report.get("messages") or []:
            severity = int(message.get("severity", 0))
            error = str(message.get("error", ""))
            print(f"{SEVERITY.get(severity, severity)} {message.get('path', '')} {error}")
            shown.add(error)
            failed = failed or severity >= threshold
        for error in report.get("errors") or []:
            if str(error) not in shown:  # the summary repeats most messages
                print(f"ERROR {error}")
        return 1 if failed else 0

    try:
        with helm.Chart.load(args.chart) as chart:
            rendered = chart.render(values, name=args.name, namespace=args.namespace,
                                    is_install=True)
    except helm.HelmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    for path in sorted(rendered):
        text = rendered[path].strip().removeprefix("---").strip()
        if text and not path.endswith("NOTES.txt"):
            print(f"---\n# Source: {path}\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
