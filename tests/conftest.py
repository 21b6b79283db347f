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
def mlflow_store(tmp_path_factory) -> str:
    """One MLflow tracking store for the whole session (MLFLOW_TRACKING_URI, inherited by training
    workers): a new SQLite store runs MLflow's schema migrations, about 8 s on 2 cores, once instead
    of once per test storage root."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session", autouse=True)
def precision_probe_cache(tmp_path_factory) -> Path:
    """`precision: auto` caches its measurement here, not under the working directory's storage root."""
    path = tmp_path_factory.mktemp("probes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFT_DAGSTER_PROBE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session", autouse=True)
def absl_handler_on_the_real_stderr():
    """rouge-score (ROUGE metrics) imports absl, whose log handler keeps the sys.stderr it was created
    with; a Dagster run (`logging.config.dictConfig` closes every handler) then closed it, and where that
    was pytest's capture (a `capsys` test after a ROUGE-scoring one) pytest itself failed with "I/O
    operation on closed file". On the real stderr absl never closes it."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        yield
        return
    handler = absl_logging.get_absl_handler().python_handler
    kept, handler.stream = handler.stream, sys.__stderr__
    yield
    handler.stream = kept
