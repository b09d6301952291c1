"""LLM rerankers: a causal LM asked whether a document meets a query, scored by its next-token
logits of the answer tokens at the last token of the prompt.

Two conventions, by how many answer tokens there are. Two (Qwen3-Reranker: "no", "yes"): the
probability of the true answer over the false one, softmax(l_false, l_true)[1] =
sigmoid(l_true - l_false), so the score's logit is the difference. One (bge-reranker-v2-gemma,
FlagEmbedding's LLM rerankers: "Yes"): the logit of that token is the score's logit, and its
sigmoid is FlagEmbedding's `compute_score(normalize=True)`.

As a transform of a built decoder: the LM head is reduced at load to the answer tokens' rows, so
the model becomes a one-label classifier on the last token, without a projection onto the whole
vocabulary (with the checkpoint's `final_logit_softcapping`, Gemma2/3, the answer logits are
capped as transformers caps them). Pairs are written into the model's prompt template before
tokenizing (`ScoreTemplate`).

Configured by `--pooler-config` keys: `answer_tokens` (["no", "yes"]: the false, then the true
answer; or one token, the true answer alone), `score_template` (a built-in name, or a format
string with {instruction}, {query} and {document}), `score_instruction`. A Qwen3 causal LM served
from a source named like a reranker (`Qwen/Qwen3-Reranker-0.6B`) gets Qwen3-Reranker's published
defaults, a Gemma causal LM from a source named like bge-reranker-v2-gemma FlagEmbedding's.
"""

from __future__ import annotations

import dataclasses
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
    """How a (query, document) pair is written for the model: `pieces`, format strings with
    {instruction}, {query} and {document}, each tokenized on its own (no special tokens added),
    as the reference does; the piece that holds {document} is cut from its end when a pair is
    too long. `answers`: the answer tokens when the pooler config names none."""

    pieces: tuple[str, ...]
    instruction: str
    answers: tuple[str, ...] = ("no", "yes")

    def texts(self, query: str, document: str) -> list[str]:
        return [p.format(instruction=self.instruction, query=query, document=document)
                for p in self.pieces]

    @property
    def document_piece(self) -> int:
        return next(i for i, p in enumerate(self.pieces) if "{document}" in p)


# Qwen3-Reranker's model card: the system prompt, the chat markup, an empty thinking block.
QWEN3 = ScoreTemplate(
    ("<|im_start|>system\nJudge whether the Document meets the requirements based on the "
     "Query and the Instruct provided. Note that the answer can only be \"yes\" or "
     "\"no\".<|im_end|>\n<|im_start|>user\n",
     "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
     "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "Given a web search query, retrieve relevant passages that answer the query")
# FlagEmbedding's FlagLLMReranker (BaseLLMReranker.compute_score): <bos>, "A: " + query, "\n",
# "B: " + passage, "\n", then the prompt, each tokenized apart; the score is the "Yes" logit.
BGE_GEMMA = ScoreTemplate(
    ("<bos>", "A: {query}", "\n", "B: {document}", "\n", "{instruction}"),
    "Given a query A and a passage B, determine whether the passage contains an answer to the "
    "query by providing a prediction of either 'Yes' or 'No'.",
    answers=("Yes",))
TEMPLATES = {"qwen3": QWEN3, "bge-reranker-v2-gemma": BGE_GEMMA}
# A causal LM of these architectures served from a source whose name holds the marker gets the
# template without asking.
_KNOWN = (("Qwen3ForCausalLM", "reranker", "qwen3"),
          ("GemmaForCausalLM", "bge-reranker-v2-gemma", "bge-reranker-v2-gemma"))


def reranker_config(architecture: str, source: str,
                    config: PoolerConfig) -> tuple[ScoreTemplate, tuple[str, ...]] | None:
    """The template and answer tokens `config` asks for (or a known reranker's, for a causal LM
    whose source names it); None for other models."""
    asked = config.answer_tokens is not None or config.score_template is not None
    known = next((name for arch, marker, name in _KNOWN
                  if architecture == arch and marker in source.lower()), None)
    if not asked and known is None:
        return None
    if not architecture.endswith("ForCausalLM"):
        raise ModelLoadError(f"an LLM reranker needs a causal LM checkpoint (…ForCausalLM, with "
                             f"its lm_head); {architecture} is not one")
    name = config.score_template or known or "qwen3"
    if name in TEMPLATES:
        template = TEMPLATES[name]
    elif "{query}" in name and "{document}" in name:
        template = ScoreTemplate((name,), QWEN3.instruction)
    else:
        raise ModelLoadError(f"score_template {name!r} is neither a built-in template "
                             f"({', '.join(TEMPLATES)}) nor a format string with {{query}} and "
                             "{document}")
    if config.score_instruction is not None:
        template = dataclasses.replace(template, instruction=config.score_instruction)
    return template, tuple(config.answer_tokens or template.answers)


class AnswerReranker(Backend):
    """A decoder body and its LM head's answer rows: one logit on the last token, the true
    answer's minus the false one's (two answers) or the answer's own (one)."""

    kind = Kind.CLASSIFIER
    head_pooling = PoolingType.LAST
    default_pooling = PoolingType.LAST
    num_labels = 1

    def __init__(self, body: nn.Module, answer_rows: torch.Tensor,
                 softcap: float | None = None):
        super().__init__()
        self.body = body
        self.softcap = softcap
        self.score = nn.Linear(answer_rows.shape[1], answer_rows.shape[0], bias=False)
        with torch.no_grad():
            self.score.weight.copy_(answer_rows)  # [answers, hidden]

    @property
    def hidden_size(self) -> int:
        return self.body.hidden_size

    @property
    def max_positions(self) -> int:
        return self.body.max_positions

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.body(batch)  # [num_tokens, hidden]

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.score(rows)  # [rows, answers]: the LM's logits of the answer tokens
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if logits.shape[1] == 2:  # the true answer's logit over the false one's
            return logits[:, 1:] - logits[:, :1]
        return logits  # [rows, 1]


def answer_rows(path: Path, hf_config: dict, token_ids: tuple[int, ...]) -> torch.Tensor:
    """The LM head's rows of the answer tokens [answers, hidden], read from the checkpoint without
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
