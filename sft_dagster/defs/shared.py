"""Where a pipeline's human-facing files live, and the base model's tokenizer for the data stages."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from .. import models
from ..spec import PipelineSpec
from .resources import SFTStorage


def corrections_path(spec: PipelineSpec, storage: SFTStorage) -> Path:
    """The corrections file data engineers edit: the spec's, or `<pipeline>/labels/corrections.csv`."""
    if spec.labels.corrections_file:
        return spec.resolve(spec.labels.corrections_file)
    return storage.paths(spec.name).default_corrections_file


def review_queue_path(spec: PipelineSpec, storage: SFTStorage) -> Path:
    return corrections_path(spec, storage).parent / "review_queue.csv"


def registry_dir(spec: PipelineSpec, storage: SFTStorage) -> Path:
    """The pipeline's folder in the model registry (`promotion.registry`, or under the storage root)."""
    if spec.promotion.registry:
        return spec.resolve(spec.promotion.registry) / spec.name
    return storage.paths(spec.name).registry_dir


def file_version(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "absent"


def resolve_base_model(spec: PipelineSpec, storage: SFTStorage) -> models.ResolvedModel:
    """The spec's base model as a local directory (converted once, cached under the storage root)."""
    return models.resolve_base_model(spec.model, storage.paths(spec.name).model_cache, spec.base_dir)


@functools.lru_cache(maxsize=8)
def _tokenizer(model_dir: str, tokenizer_hash: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def tokenizer_for(spec: PipelineSpec, storage: SFTStorage):
    """The base model's tokenizer (what training will see), for token-length and control-token checks.

    Resolved from the spec rather than read from the `base_model` asset, so a run that selects only
    data stages works before the base model was ever materialized; resolution is cached, so both give
    the same directory and hashes.
    """
    resolved = resolve_base_model(spec, storage)
    return _tokenizer(str(resolved.path), resolved.tokenizer_hash)
