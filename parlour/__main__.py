"""`python -m parlour` runs the command line."""

from .cli import main

main()
