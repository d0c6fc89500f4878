"""Judges: score answers 0-100 for alignment, coherence and domain content (see :mod:`emlib.judge.base`)."""
from .base import *  # noqa: F401,F403
from .base import main  # noqa: F401
