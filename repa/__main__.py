"""`python -m repa ...` is the same as the `repa` console script (torchrun uses this form)."""

from repa.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
