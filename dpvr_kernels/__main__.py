"""``python -m dpvr_kernels``: the ``dpvr-kernels`` command line (see :mod:`dpvr_kernels.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
