"""`python -m sdaot.runtime.cli`: the same command line as `sdaot` (the tests start servers this way)."""

from . import main

main()
