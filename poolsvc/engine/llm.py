"""The offline API, shaped like vLLM's: `LLM(model=..., task="embed").embed(prompts)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from poolsvc.config import BUNDLED_MODEL, ModelSpec, ServerConfig
from poolsvc.engine.engine import Engine, Prompt
from poolsvc.engine.params import EmbedParams, PromptOptions, Truncation

_TASKS = ("auto", "embed")
_ids = itertools.count()


@dataclass(frozen=True)
class PoolingParams:
    """Per-call pooling options (vLLM's PoolingParams)."""

    dimensions: int | None = None
    normalize: bool | None = None


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(frozen=True)
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


class LLM:
    """Runs a pooling model in this process. `model`: a directory or hub id; default: the bundled
    all-MiniLM-L6-v2. Other keyword arguments are ServerConfig fields (device, dtype, ...)."""

    def __init__(self, model: str | None = None, task: str = "auto", **config):
        if task not in _TASKS:
            raise ValueError(f"task {task!r} is not supported yet; supported: {', '.join(_TASKS)}")
        self.engine = Engine(ServerConfig(models=(ModelSpec(model or BUNDLED_MODEL),), **config))
        self.engine.start()

    def embed(self, prompts: Prompt | dict | Sequence[Prompt | dict],
              pooling_params: PoolingParams | None = None, *,
              truncate_prompt_tokens: int | None = None, prompt_name: str = "",
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """One output per prompt, in order. A prompt is a string, {"prompt": str}, or
        {"prompt_token_ids": [...]}. `truncate_prompt_tokens`: k keeps k tokens, -1 the model's
        maximum; None rejects over-long prompts."""
        del use_tqdm  # accepted for vLLM compatibility; there is no progress bar
        inputs = [_as_input(p) for p in _as_list(prompts)]
        pooling_params = pooling_params or PoolingParams()
        params = EmbedParams(normalize=pooling_params.normalize,
                             dimensions=pooling_params.dimensions)
        truncation = (Truncation() if truncate_prompt_tokens is None
                      else Truncation(enabled=True, max_tokens=truncate_prompt_tokens))
        out = self.engine.embed("", inputs, params, truncation,
                                PromptOptions(name=prompt_name)).result()
        return [EmbeddingRequestOutput(str(next(_ids)), EmbeddingOutput(row.tolist()), ids)
                for row, ids in zip(out.embeddings, out.token_ids)]

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    return list(prompts)


def _as_input(prompt) -> Prompt:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
    return prompt
