"""Run the command-line interface with `python -m dynscope`."""

from dynscope.cli import main

main()
