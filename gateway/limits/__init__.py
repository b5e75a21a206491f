"""Admission limits: pure policy math, an in-process backend and a Redis backend."""
