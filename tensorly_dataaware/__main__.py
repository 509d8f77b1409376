"""``python -m tensorly_dataaware``: the same program as the ``tensorly-dataaware`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
