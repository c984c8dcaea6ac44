"""Allow ``python -m ekd`` (and ``torchrun -m ekd``)."""

from ekd.commands.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
