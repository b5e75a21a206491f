"""The realtime-gateway benchmark (issue 7): ``python -m bench.run``; see ``bench/README.md``."""
