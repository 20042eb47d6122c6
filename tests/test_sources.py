from pathlib import Path

import pytest
import torch

from tailor.config.settings import ModelConfig
from tailor.models.sources import ModelSourceError, check_source, materialize
from tailor.store.checkpoint import FINGERPRINT_FILE, fingerprint_dir, load_model


def test_tiny_source_is_deterministic_and_fingerprinted(tmp_path):
    a = materialize(ModelConfig(source="tiny"), str(tmp_path / "a"))
    b = materialize(ModelConfig(source="tiny"), str(tmp_path / "b"))
    assert a.fingerprint == b.fingerprint == fingerprint_dir(a.path)
    assert (tmp_path / "a" / "checkpoints").is_dir()
    # Materialising again reuses the folder.
    assert materialize(ModelConfig(source="tiny"), str(tmp_path / "a")) == a


def test_local_hf_folder_source(tmp_path, tiny_model, tiny_tokenizer):
    folder = tmp_path / "my-model"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    ref = materialize(ModelConfig(source="hf", name_or_path=str(folder)), str(tmp_path / "work"))
    model, tokenizer = load_model(ref)
    enc = tokenizer("hello there", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, tiny_model(**enc).logits)


def test_a_rewritten_fingerprint_is_detected(tmp_path):
    ref = materialize(ModelConfig(source="tiny"), str(tmp_path))
    (Path(ref.path) / FINGERPRINT_FILE).write_text("0" * 64)
    with pytest.raises(RuntimeError, match="does not match fingerprint"):
        ref.verify()


def test_an_edited_weight_file_is_detected_by_a_contents_check(tmp_path):
    ref = materialize(ModelConfig(source="tiny"), str(tmp_path))
    weights = next(Path(ref.path).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    ref.verify()  # the cheap check reads only the FINGERPRINT file
    with pytest.raises(RuntimeError, match="files changed since fingerprint"):
        ref.verify(contents=True)


def test_unreachable_hub_id_offline():
    with pytest.raises(ModelSourceError, match="model.offline=true forbids downloading"):
        check_source(ModelConfig(source="hf", name_or_path="no-such-org/no-such-model", offline=True))
