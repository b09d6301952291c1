"""The offline API, shaped like vLLM's: `LLM(model=..., task="embed").embed(prompts)`."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from poolsvc.config import BUNDLED_MODEL, ModelSpec, PoolerConfig, PoolerOverride, ServerConfig
from poolsvc.engine.engine import Engine, Prompt
from poolsvc.engine.images import ImageInput
from poolsvc.engine.outputs import Output
from poolsvc.engine.params import PoolingParams, PromptOptions, Task, Truncation

_ids = itertools.count()


@dataclass(frozen=True)
class PoolingOutput:
    data: torch.Tensor


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(frozen=True)
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass(frozen=True)
class ScoringOutput:
    score: float


@dataclass(frozen=True)
class PoolingRequestOutput:
    """One prompt's result; `outputs` is the task's output class (vLLM's names)."""

    request_id: str
    outputs: PoolingOutput | EmbeddingOutput | ClassificationOutput | ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


# vLLM's names for the per-task request outputs.
EmbeddingRequestOutput = ClassificationRequestOutput = ScoringRequestOutput = PoolingRequestOutput


class LLM:
    """Runs a pooling model in this process.

    `model`: a directory or hub id (default: the bundled all-MiniLM-L6-v2). `task`: "auto", or a
    task the model must serve ("embed", "classify", "score", "reward", ...). `pooler_config`:
    a dict or PoolerConfig, as the server's --pooler-config. Other keyword arguments are
    ServerConfig fields (device, dtype, max_batch_tokens, ...)."""

    def __init__(self, model: str | None = None, task: str = "auto",
                 pooler_config: dict | PoolerConfig | None = None, **config):
        overrides = ()
        if pooler_config is not None:
            if isinstance(pooler_config, dict):
                pooler_config = PoolerConfig.from_json(json.dumps(pooler_config))
            overrides = (PoolerOverride("", pooler_config),)
        self.engine = Engine(ServerConfig(models=(ModelSpec(model or BUNDLED_MODEL),),
                                          pooler_configs=overrides, **config))
        self.engine.start()
        if task != "auto":
            try:
                wanted = Task(task)
            except ValueError:
                raise ValueError(f"task {task!r} is not one of "
                                 f"{['auto'] + [t.value for t in Task]}") from None
            self.engine.model("").check_task(wanted)

    def embed(self, prompts, pooling_params: PoolingParams | None = None, *,
              truncate_prompt_tokens: int | None = None, prompt_name: str = "",
              use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """One output per prompt, in order. A prompt is a string, {"prompt": str}, or
        {"prompt_token_ids": [...]}. `truncate_prompt_tokens`: k keeps k tokens, -1 the model's
        maximum; None rejects over-long prompts."""
        out = self.engine.embed("", _inputs(prompts), pooling_params or PoolingParams(),
                                _truncation(truncate_prompt_tokens),
                                PromptOptions(name=prompt_name)).result()
        return _wrap(out, [EmbeddingOutput(row.tolist()) for row in out.embeddings])

    def classify(self, prompts, pooling_params: PoolingParams | None = None, *,
                 truncate_prompt_tokens: int | None = None,
                 use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        out = self.engine.classify("", _inputs(prompts), pooling_params or PoolingParams(),
                                   _truncation(truncate_prompt_tokens)).result()
        return _wrap(out, [ClassificationOutput(row.tolist()) for row in out.probs])

    def score(self, data_1, data_2, pooling_params: PoolingParams | None = None, *,
              truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """Scores pairs: one text against many, many against one, or two equal-length lists."""
        out = self.engine.score("", _inputs(data_1), _inputs(data_2),
                                pooling_params or PoolingParams(),
                                _truncation(truncate_prompt_tokens)).result()
        return _wrap(out, [ScoringOutput(float(s)) for s in out.scores])

    def encode(self, prompts, pooling_params: PoolingParams | None = None, *,
               pooling_task: str | None = None, truncate_prompt_tokens: int | None = None,
               use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """The raw pooled output of `pooling_task` (default: the model's per-token task)."""
        task = Task(pooling_task) if pooling_task else None
        out = self.engine.encode("", _inputs(prompts), task, pooling_params or PoolingParams(),
                                 _truncation(truncate_prompt_tokens)).result()
        return _wrap(out, [PoolingOutput(torch.from_numpy(a)) for a in out.outputs])

    def reward(self, prompts, pooling_params: PoolingParams | None = None, *,
               truncate_prompt_tokens: int | None = None,
               use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        return self.encode(prompts, pooling_params, pooling_task="reward",
                           truncate_prompt_tokens=truncate_prompt_tokens)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _inputs(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    return [_as_input(p) for p in prompts]


def _as_input(prompt) -> Prompt:
    if isinstance(prompt, dict):
        if "image" in prompt:  # encoded bytes or a PIL image
            return ImageInput(prompt["image"], prompt.get("mime_type", ""))
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a dict prompt needs 'prompt', 'prompt_token_ids' or 'image'")
    return prompt


def _truncation(truncate_prompt_tokens: int | None) -> Truncation:
    if truncate_prompt_tokens is None:
        return Truncation()
    return Truncation(enabled=True, max_tokens=truncate_prompt_tokens)


def _wrap(out: Output, results: Sequence) -> list[PoolingRequestOutput]:
    return [PoolingRequestOutput(str(next(_ids)), r, ids)
            for r, ids in zip(results, out.token_ids)]
