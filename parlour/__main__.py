"""`python -m parlour` runs the command line."""

from .cli.main import main

main()
