import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER_DIR = Path(os.environ.get("EMLIB_TEST_PAPER_DIR", ROOT.parent / "shared" / "data" / "paper"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def paper_dir() -> Path:
    if not (PAPER_DIR / "training_datasets").is_dir():
        pytest.skip(f"the paper's data is not at {PAPER_DIR} (set EMLIB_TEST_PAPER_DIR)")
    return PAPER_DIR


@pytest.fixture(scope="session")
def tiny():
    from emlib.models import tiny_model

    return tiny_model(seed=0)
