"""`python -m mesh.cli` runs the `maas` command line."""

from mesh.cli import main

main()
