"""``python -m loratune ...``: the same as the ``loratune`` command."""

from loratune.cli.main import entry

if __name__ == "__main__":
    entry()
