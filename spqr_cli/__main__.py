"""``python -m spqr_cli`` runs the ``spqr`` command line."""

from spqr_cli.cli import main

main()
