"""``python -m soundcheck``: the same as the ``soundcheck`` command."""

from soundcheck.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
