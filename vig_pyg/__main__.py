"""``python -m vig_pyg``: the ``vig-pyg`` command line."""

import sys

from vig_pyg.cli import main

if __name__ == "__main__":
    sys.exit(main())
