"""Small randomly initialised Hugging Face encoders of each supported family, saved to a directory the way
a user's model directory is (config.json, model.safetensors, the tokenizer; optionally the
sentence-transformers pooling files): the real loading code reads them, nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recast_core.backbone import minilm_path

FAMILIES = ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet")
HIDDEN = 32


def save_tokenizer(directory: Path) -> int:
    """The bundled MiniLM's WordPiece tokenizer saved into `directory`; its vocabulary size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


def _config(family: str, layers: int, vocab: int, pad: int) -> Any:
    import transformers as tf

    if family == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=vocab, dim=HIDDEN, n_layers=layers, n_heads=2, hidden_dim=64, pad_token_id=pad
        )
    if family == "t5":  # an encoder-decoder family the project does not support
        return tf.T5Config(vocab_size=vocab, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=layers, num_heads=2)
    classes = {
        "bert": tf.BertConfig,
        "roberta": tf.RobertaConfig,
        "xlm-roberta": tf.XLMRobertaConfig,
        "mpnet": tf.MPNetConfig,
    }
    return classes[family](
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=pad,
    )


def write_pooling(directory: Path, mode: str) -> None:
    """sentence-transformers' modules.json and 1_Pooling/config.json asking for `mode` pooling."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{m}": m.startswith(mode) for m in ("cls_token", "mean_tokens", "max_tokens")}
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, **flags})
    )


def build_backbone(
    directory: Path, family: str, layers: int = 2, seed: int = 0, pooling: str | None = None
) -> Path:
    """A randomly initialised `family` encoder of `layers` layers (hidden size 32) saved in `directory`."""
    from transformers import AutoModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(directory)
    torch.manual_seed(seed)
    AutoModel.from_config(_config(family, layers, vocab, pad=0)).save_pretrained(str(directory))
    if pooling is not None:
        write_pooling(directory, pooling)
    return directory
