"""`python -m idlegrid` runs the CLI."""

from idlegrid.client.cli import main

main()
