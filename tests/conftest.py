import json
from pathlib import Path

import pytest

# lme4 1.1-31 reference fits, copied from ../shared/reference (provenance in tests/data/lme4_reference_README.md)
REFERENCE = Path(__file__).resolve().parent / "data" / "lme4_reference.json"


def load_reference() -> dict:
    return json.loads(REFERENCE.read_text())["models"]


@pytest.fixture(scope="session")
def lme4_reference() -> dict:
    return load_reference()


@pytest.fixture(scope="session")
def sleep_model():
    """sleepstudy's ``Reaction ~ Days + (Days | Subject)`` (shared; a test file may define its own)."""
    from bayeslmm import Model

    return Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")


@pytest.fixture(scope="session")
def sleep_reml(sleep_model):
    return sleep_model.fit(method="reml")
