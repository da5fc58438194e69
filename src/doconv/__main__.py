"""``python -m doconv``: the same program as the ``doconv`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
