"""Shared test fixtures.

Exports:
- `build_tiny_bpe_tokenizer(directory) -> Path`: trains a byte-level BPE tokenizer (vocab 512,
  special tokens <s> = 0 and </s> = 1) on a fixed corpus with ASCII, accented, Chinese and emoji
  text, and saves it as a transformers tokenizer in `directory`. Deterministic, ~0.1 s.
- fixture `tiny_bpe_tokenizer_dir` (session): a directory holding that tokenizer, for
  `AutoTokenizer.from_pretrained`.
- fixture `tiny_checkpoints` (session): {family: folder} of tiny random-weight checkpoints
  (tests/tiny_models.py builds them; import builders from `tiny_models`).
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels can only run in its interpreter; a kernel is interpreted or not
# from when its module is imported, so this is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tiny_models import FAMILIES, make_tiny_checkpoint

# The GPU machine runs the suite from source without the optional GGUF reader.
collect_ignore = [] if importlib.util.find_spec("gguf") else ["model_loader/test_gguf.py"]

TINY_BPE_VOCAB_SIZE = 512

_WORDS = (
    "the a of to and in is it that for on with as was at by be this from or an are not have "
    "hello world token cache block paged attention model sample prompt output engine stop "
    "café naïve résumé déjà über façade piñata "
    "中文 你好 世界 模型 缓存 注意力 "
    "🙂 🚀 👍🏽 ✨ "
    ", . ! ? : ; ( ) 123 4567 \n"
).split(" ")


# Pseudo-words over these characters give enough merges for the full vocabulary, including
# merges of partial UTF-8 sequences (CJK characters share lead bytes).
_LETTERS = "abcdefghijklmnopqrstuvwxyzéèàüö中文字模型缓存你好世界"


def _corpus(num_sentences: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = list(_WORDS) + ["".join(rng.choices(_LETTERS, k=rng.randint(2, 6))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(num_sentences)]


def build_tiny_bpe_tokenizer(directory: str | Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )
    directory = Path(directory)
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bpe_tokenizer(tmp_path_factory.mktemp("tiny_bpe_tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {family: make_tiny_checkpoint(root / family, family) for family in FAMILIES}
