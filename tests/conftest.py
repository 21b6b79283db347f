import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + ChatML tokenizer saved as a local model directory."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session", autouse=True)
def precision_probe_cache(tmp_path_factory) -> Path:
    """`precision: auto` caches its measurement here, not under the working directory's storage root."""
    import os

    path = tmp_path_factory.mktemp("probes")
    previous = os.environ.get("SFT_DAGSTER_PROBE_CACHE")
    os.environ["SFT_DAGSTER_PROBE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SFT_DAGSTER_PROBE_CACHE", None)
    else:
        os.environ["SFT_DAGSTER_PROBE_CACHE"] = previous
