"""Loading the tokenizer named by the model config."""

from __future__ import annotations

import logging

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedllm.config import ModelConfig

logger = logging.getLogger(__name__)


def init_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer through transformers, or None with skip_tokenizer_init=True.
    A GGUF model without `tokenizer=` uses the tokenizer stored in the file's metadata."""
    if model_config.skip_tokenizer_init:
        return None
    path = model_config.tokenizer
    if model_config.gguf_file is not None and path == model_config.model_path:
        from pagedllm.model_loader.gguf import load_gguf_tokenizer

        path = load_gguf_tokenizer(model_config.gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path,
            use_fast=model_config.tokenizer_mode != "slow",
            trust_remote_code=model_config.trust_remote_code,
            revision=model_config.tokenizer_revision,
        )
    except ValueError as error:
        if not model_config.trust_remote_code and "trust_remote_code" in str(error):
            raise ValueError(
                f"The tokenizer of {path!r} needs custom code from its repository; pass "
                "trust_remote_code=True if you trust it."
            ) from error
        raise
    except OSError as error:
        raise ValueError(
            f"Could not load a tokenizer from {path!r} ({error}); pass tokenizer= a folder with "
            "tokenizer files, or skip_tokenizer_init=True and prompts as token ids."
        ) from error
    logger.info("Tokenizer %s (%s, %d tokens).", path, type(tokenizer).__name__, len(tokenizer))
    return tokenizer
