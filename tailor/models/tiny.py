"""A tiny random Gemma3 model and a byte-level BPE tokenizer built locally.

Used by the ``smoke`` profile and the fast tests: it exercises every code path
(sliding/full attention pattern, tied embeddings, BOS handling) in seconds.
"""

from __future__ import annotations

import torch

_TRAINING_TEXT = (
    "The capital of France is Paris. Machine learning is the study of algorithms that learn "
    "from data. Climate change refers to long-term shifts in temperatures and weather patterns. "
    "Question: Which of these is a mammal? Answer: a whale. The quick brown fox jumps over the "
    "lazy dog. A student learns from a teacher, and a small model learns from a large one. "
) * 4
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TINY_NUM_LAYERS = 4
TINY_CONTEXT = 512


def build_tiny_tokenizer(vocab_size: int = 384):
    """Deterministic byte-level BPE tokenizer that prepends <bos> like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def build_tiny_gemma3(tokenizer, num_layers: int = TINY_NUM_LAYERS, seed: int = 0, hidden_size: int = 64):
    """Random Gemma3 causal LM with the real architecture at toy size."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    layer_types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)]
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=TINY_CONTEXT,
        sliding_window=16,
        layer_types=layer_types,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    model.eval()
    return model
