"""`python -m sparsec`: the command line (sparsec/tools/cli.py)."""
import sys

from .tools.cli import main

sys.exit(main())
