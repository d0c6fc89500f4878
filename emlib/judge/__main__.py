"""``python -m emlib.judge score FILE --judge J --out F`` (see :mod:`emlib.judge.cli`)."""
from .cli import main

raise SystemExit(main())
