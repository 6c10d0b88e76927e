"""``python -m loratune ...``: the same as the ``loratune`` command."""

import sys

from loratune.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
