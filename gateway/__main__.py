"""``python -m gateway`` runs the command line (see :mod:`gateway.cli`)."""

from gateway.cli import main

raise SystemExit(main())
