"""LLM rerankers (Qwen3-Reranker style): a causal LM asked whether a document meets a query,
scored by its next-token probability of the "true" answer over the "false" one.

As a transform of a built decoder: the LM head is reduced at load to the difference of its two
answer rows, so the model becomes a one-label classifier on the last token, and
sigmoid(h . (w_true - w_false)) = softmax(h . w_false, h . w_true)[1]: the same probability,
without a projection onto the whole vocabulary. Pairs are written into the model's prompt
template before tokenizing (`ScoreTemplate`).

Configured by `--pooler-config` keys: `answer_tokens` (["no", "yes"]: the false, then the true
answer), `score_template` (a built-in name, or a format string with {instruction}, {query} and
{document}), `score_instruction`. A Qwen3 causal LM served from a source named like a reranker
(`Qwen/Qwen3-Reranker-0.6B`) gets Qwen3-Reranker's published defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.config import PoolerConfig
from poolsvc.engine.description import Kind
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType


@dataclass(frozen=True)
class ScoreTemplate:
    """How a (query, document) pair is written for the model: `prefix` and `suffix` around the
    pair's text, each tokenized on its own (no special tokens added), as the reference does."""

    prefix: str
    pair: str          # with {instruction}, {query}, {document}
    suffix: str
    instruction: str

    def pair_text(self, query: str, document: str) -> str:
        return self.pair.format(instruction=self.instruction, query=query, document=document)


# Qwen3-Reranker's model card: the system prompt, the chat markup, an empty thinking block.
QWEN3 = ScoreTemplate(
    prefix="<|im_start|>system\nJudge whether the Document meets the requirements based on the "
           "Query and the Instruct provided. Note that the answer can only be \"yes\" or "
           "\"no\".<|im_end|>\n<|im_start|>user\n",
    pair="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    instruction="Given a web search query, retrieve relevant passages that answer the query")
TEMPLATES = {"qwen3": QWEN3}
_DEFAULT_ANSWERS = ("no", "yes")


def reranker_config(architecture: str, source: str,
                    config: PoolerConfig) -> tuple[ScoreTemplate, tuple[str, str]] | None:
    """The template and answer tokens `config` asks for (or Qwen3-Reranker's, for a Qwen3
    causal LM whose source names a reranker); None for other models."""
    asked = config.answer_tokens is not None or config.score_template is not None
    known = architecture == "Qwen3ForCausalLM" and "reranker" in source.lower()
    if not asked and not known:
        return None
    if not architecture.endswith("ForCausalLM"):
        raise ModelLoadError(f"an LLM reranker needs a causal LM checkpoint (…ForCausalLM, with "
                             f"its lm_head); {architecture} is not one")
    name = config.score_template or "qwen3"
    if name in TEMPLATES:
        template = TEMPLATES[name]
    elif "{query}" in name and "{document}" in name:
        template = ScoreTemplate("", name, "", QWEN3.instruction)
    else:
        raise ModelLoadError(f"score_template {name!r} is neither a built-in template "
                             f"({', '.join(TEMPLATES)}) nor a format string with {{query}} and "
                             "{document}")
    if config.score_instruction is not None:
        template = ScoreTemplate(template.prefix, template.pair, template.suffix,
                                 config.score_instruction)
    return template, tuple(config.answer_tokens or _DEFAULT_ANSWERS)


class AnswerReranker(Backend):
    """A decoder body, its LM head reduced to w_true - w_false: one logit on the last token."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.LAST
    default_pooling = PoolingType.LAST
    num_labels = 1

    def __init__(self, body: nn.Module, answer_rows: torch.Tensor):
        super().__init__()
        self.body = body
        false_row, true_row = answer_rows  # [2, hidden]
        self.score = nn.Linear(answer_rows.shape[1], 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_((true_row - false_row)[None])

    @property
    def hidden_size(self) -> int:
        return self.body.hidden_size

    @property
    def max_positions(self) -> int:
        return self.body.max_positions

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.body(batch)  # [num_tokens, hidden]

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        return self.score(rows)  # [rows, 1]: the logit of the true answer over the false one


def answer_rows(path: Path, hf_config: dict, token_ids: tuple[int, int]) -> torch.Tensor:
    """The LM head's rows of the two answer tokens [2, hidden], read from the checkpoint without
    loading the whole head (the input embeddings when the head is tied to them)."""
    from safetensors import safe_open

    tied = bool(hf_config.get("tie_word_embeddings", False))
    names = (["model.embed_tokens.weight"] if tied else []) + ["lm_head.weight",
                                                               "model.embed_tokens.weight"]
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                if name in f.keys():
                    table = f.get_slice(name)
                    return torch.stack([table[i] for i in token_ids]).float()
    raise ModelLoadError(f"{path}: no lm_head.weight (nor tied input embeddings) in the "
                         "safetensors files: an LLM reranker needs its LM head")
