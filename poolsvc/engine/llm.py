"""The offline API, shaped like vLLM's: `LLM(model=..., task="embed").embed(prompts)`.

Each call becomes PoolingRequest values for the engine, as a gRPC call does. Any number of
prompts is accepted: they are submitted in slices (all queued at once, so the engine batches them
as one stream), which also drives the `use_tqdm` progress bar. vLLM's spellings that users paste
are accepted with vLLM's meaning, or refused with a message naming poolsvc's spelling."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from poolsvc.engine.config import (
    BUNDLED_MODEL,
    REMOVED,
    EngineConfig,
    Limits,
    LoraSpec,
    ModelSpec,
    PoolerConfig,
    PoolerOverride,
)
from poolsvc.engine.engine import Engine
from poolsvc.engine.errors import EngineError, Option
from poolsvc.engine.images import ImageInput
from poolsvc.engine.outputs import MultiEmbedOutput, Output, SparseEmbedOutput, SparseVector
from poolsvc.engine.params import (
    EmbeddingType,
    HybridWeights,
    InputRole,
    PoolingParams,
    PromptOptions,
    SparseOptions,
    Task,
    Truncation,
)
from poolsvc.engine.request import PoolingRequest, Prompt

_ids = itertools.count()
# How this API spells the options an engine error points to.
OFFLINE_SPELLING = {
    Option.TRUNCATE: "truncate_prompt_tokens=-1",
    Option.TRUNCATE_LENGTH: "truncate_prompt_tokens",
}
_SLICE = 256  # prompts per submitted request
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_LIMIT_FIELDS = {f.name for f in dataclasses.fields(Limits)}
# vLLM's dtype names beside torch's.
_DTYPES = {"half": "float16", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "float32": "float32", "auto": "auto"}
# vLLM LLM(...) arguments with no meaning here (its scheduler, CUDA graphs, parallelism): taken
# and ignored only at the value that asks for nothing.
_VLLM_NO_OPS = {"runner": "pooling", "enforce_eager": None, "tensor_parallel_size": 1,
                "trust_remote_code": False, "gpu_memory_utilization": None, "seed": None,
                "enable_lora": None, "max_lora_rank": None, "max_loras": None}


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: the adapter a call runs with (`lora_request=`). Adapters are loaded
    with the LLM (`LLM(model, loras={name: path})`), where their fit with the model is checked;
    a call names one by `lora_name` (or passes the name alone). vLLM's own LoRARequest works
    too."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


@dataclass(frozen=True)
class PoolingOutput:
    data: torch.Tensor


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]
    # Sparse (SPLADE) models: the non-zero weights, largest first; `embedding` is then the full
    # vector over the vocabulary, as sentence-transformers' SparseEncoder.encode gives it.
    sparse: SparseVector | None = None
    # Models with several embeddings (BGE-M3), with embedding_types: the token vectors
    # [num_tokens - 1, D] when asked for (`embedding` is then the dense vector, or empty).
    multi_vector: torch.Tensor | None = None

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


T = TypeVar("T")


@dataclass(frozen=True)
class PoolingRequestOutput(Generic[T]):
    """One prompt's result; `outputs` is the task's output class (vLLM's names)."""

    request_id: str
    outputs: T
    prompt_token_ids: list[int]
    finished: bool = True


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    pass


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    pass


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    pass


class LLM:
    """Runs a pooling model in this process.

    `model`: a directory or hub id (default: the bundled all-MiniLM-L6-v2). `task`: "auto", or a
    task the model must serve ("embed", "classify", "score", "reward", ...). `pooler_config`:
    a dict or PoolerConfig, as the server's --pooler-config. `max_model_len`: the longest input
    in tokens. `loras`: LoRA adapters (peft directories) to serve, {name: path} or LoRARequests;
    each call then takes `lora_request=` (a name or a LoRARequest). Other keyword arguments are
    EngineConfig fields (device, dtype, max_batch_tokens, ...) or Limits fields
    (max_image_pixels, ...)."""

    def __init__(self, model: str | None = None, task: str = "auto",
                 pooler_config: dict | PoolerConfig | None = None, **kwargs):
        task = kwargs.pop("convert", task)  # vLLM's newer name for the same choice
        override = kwargs.pop("override_pooler_config", None)
        pooler_config = pooler_config if pooler_config is not None else override
        kwargs = _vllm_arguments(kwargs)
        if "loras" in kwargs:
            kwargs["loras"] = _lora_specs(kwargs["loras"])
        overrides = ()
        if pooler_config is not None:
            if isinstance(pooler_config, dict):
                pooler_config = PoolerConfig.from_dict(pooler_config)
            overrides = (PoolerOverride("", pooler_config),)
        limits = Limits(**{k: kwargs.pop(k) for k in list(kwargs) if k in _LIMIT_FIELDS})
        if removed := sorted(set(kwargs) & set(REMOVED)):
            raise TypeError(f"LLM({removed[0]}=...): " + REMOVED[removed[0]].format(dtype="dtype"))
        if unknown := sorted(set(kwargs) - _ENGINE_FIELDS):
            known = sorted(_ENGINE_FIELDS - {"models", "pooler_configs"} | _LIMIT_FIELDS)
            raise TypeError(f"LLM got unknown options {unknown}; poolsvc's options: model, task, "
                            f"pooler_config, {', '.join(known)}")
        self.engine = Engine(EngineConfig(models=(ModelSpec(model or BUNDLED_MODEL),),
                                          pooler_configs=overrides, **kwargs), limits)
        self.engine.start()
        if task != "auto":
            try:
                wanted = Task(task)
            except ValueError:
                raise ValueError(f"task {task!r} is not one of "
                                 f"{['auto'] + [t.value for t in Task]}") from None
            self.engine.model("").check_task(wanted)

    def embed(self, prompts, pooling_params=None, *, truncate_prompt_tokens: int | None = None,
              prompt_name: str = "", tokenization_kwargs: dict | None = None,
              use_tqdm: bool = False, sparse_top_k: int = 0, return_tokens: bool = False,
              embedding_types: tuple[str, ...] = (),
              lora_request=None) -> list[EmbeddingRequestOutput]:
        """One output per prompt, in order. A prompt is a string, {"prompt": str}, or
        {"prompt_token_ids": [...]}. `truncate_prompt_tokens`: k keeps k tokens, -1 the model's
        maximum; None rejects over-long prompts. Sparse models: `sparse_top_k` keeps the k
        largest weights, `return_tokens` adds the tokens' strings (`outputs.sparse`). Models
        with several embeddings (BGE-M3): `embedding_types` ("dense", "sparse", "multi_vector")
        fills `outputs.embedding`, `outputs.sparse` and `outputs.multi_vector` from one forward
        pass. `lora_request`: the LoRA adapter to run with (a name or a LoRARequest; None: the
        base model), in every method."""
        try:
            types = frozenset(EmbeddingType(t) for t in embedding_types)
        except ValueError:
            raise ValueError(f"embedding_types must be among 'dense', 'sparse', 'multi_vector'; "
                             f"got {list(embedding_types)}") from None
        outs = self._run(Task.EMBED, prompts, pooling_params, truncate_prompt_tokens,
                         tokenization_kwargs, use_tqdm, prompt=PromptOptions(name=prompt_name),
                         sparse=SparseOptions(sparse_top_k, return_tokens),
                         embedding_types=types, lora_request=lora_request)
        return _wrap(EmbeddingRequestOutput, outs, _embeddings)

    def classify(self, prompts, pooling_params=None, *, truncate_prompt_tokens: int | None = None,
                 tokenization_kwargs: dict | None = None, use_tqdm: bool = False,
                 lora_request=None) -> list[ClassificationRequestOutput]:
        outs = self._run(Task.CLASSIFY, prompts, pooling_params, truncate_prompt_tokens,
                         tokenization_kwargs, use_tqdm, lora_request=lora_request)
        return _wrap(ClassificationRequestOutput, outs,
                     lambda o: [ClassificationOutput(row.tolist()) for row in o.probs])

    def score(self, data_1, data_2, pooling_params=None, *,
              truncate_prompt_tokens: int | None = None, tokenization_kwargs: dict | None = None,
              use_tqdm: bool = False, hybrid_weights: dict[str, float] | None = None,
              lora_request=None) -> list[ScoringRequestOutput]:
        """Scores pairs: one text against many, many against one, or two equal-length lists.
        Models with several embeddings (BGE-M3): `hybrid_weights` {"dense": w, "sparse": w,
        "multi_vector": w} mixes their scores as BGEM3FlagModel.compute_score does."""
        hybrid = None if hybrid_weights is None else HybridWeights(**hybrid_weights)
        outs = self._run(Task.SCORE, data_1, pooling_params, truncate_prompt_tokens,
                         tokenization_kwargs, use_tqdm, documents=data_2, hybrid=hybrid,
                         lora_request=lora_request)
        return _wrap(ScoringRequestOutput, outs,
                     lambda o: [ScoringOutput(float(s)) for s in o.scores])

    def encode(self, prompts, pooling_params=None, *, pooling_task: str | None = None,
               truncate_prompt_tokens: int | None = None, tokenization_kwargs: dict | None = None,
               use_tqdm: bool = False, input_role: str | None = None,
               lora_request=None) -> list[PoolingRequestOutput[PoolingOutput]]:
        """The raw pooled output of `pooling_task` (default: the model's per-token task).
        Multi-vector (ColBERT) models: `input_role` "query" or "document" (the default) encodes
        the prompts as that side, and each output is its [tokens, D] vectors."""
        task = Task(pooling_task) if pooling_task else self.engine.model("").default_task
        role = None
        if input_role is not None:
            try:
                role = InputRole(input_role)
            except ValueError:
                raise ValueError(f"input_role must be 'query' or 'document'; got "
                                 f"{input_role!r}") from None
        outs = self._run(task, prompts, pooling_params, truncate_prompt_tokens,
                         tokenization_kwargs, use_tqdm, raw=True, role=role,
                         lora_request=lora_request)
        return _wrap(PoolingRequestOutput, outs,
                     lambda o: [PoolingOutput(torch.from_numpy(a)) for a in o.outputs])

    def reward(self, prompts, pooling_params=None, *, truncate_prompt_tokens: int | None = None,
               tokenization_kwargs: dict | None = None, use_tqdm: bool = False,
               lora_request=None) -> list[PoolingRequestOutput[PoolingOutput]]:
        return self.encode(prompts, pooling_params, pooling_task="reward",
                           truncate_prompt_tokens=truncate_prompt_tokens,
                           tokenization_kwargs=tokenization_kwargs, use_tqdm=use_tqdm,
                           lora_request=lora_request)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one call -> PoolingRequests -------------------------------------------------------------

    def _run(self, task: Task, prompts, pooling_params, truncate_prompt_tokens: int | None,
             tokenization_kwargs: dict | None, use_tqdm: bool, *, documents=None,
             prompt: PromptOptions = PromptOptions(), raw: bool = False,
             sparse: SparseOptions = SparseOptions(), role: InputRole | None = None,
             embedding_types: frozenset[EmbeddingType] = frozenset(),
             hybrid: HybridWeights | None = None,
             lora_request=None) -> list[tuple[Output, list[int]]]:
        """Submits the call as requests of at most _SLICE prompts (or pairs) sharing their
        PoolingParams, all at once; returns each request's output with the positions, in the
        call, of the prompts (or pairs) it answers."""
        inputs = _inputs(prompts)
        docs = None if documents is None else _inputs(documents)
        params = _params(pooling_params, len(inputs) if docs is None else 1)
        adapter = _adapter_name(lora_request)
        requests, positions = [], []
        for group in sorted(set(params), key=params.index):
            members = [i for i, p in enumerate(params) if p == group] if len(params) > 1 \
                else list(range(len(inputs)))
            truncation = _truncation(truncate_prompt_tokens, group, tokenization_kwargs)
            for queries, docs_slice, places in _slices(inputs, docs, members):
                requests.append(PoolingRequest(task, queries, docs_slice, adapter=adapter,
                                               params=group,
                                               truncation=truncation, prompt=prompt, raw=raw,
                                               sparse=sparse, role=role,
                                               embedding_types=embedding_types, hybrid=hybrid))
                positions.append(places)
        try:
            futures = [self.engine.submit(r) for r in requests]
        except EngineError as exc:  # the hint in this API's spelling
            raise type(exc)(exc.spelled(OFFLINE_SPELLING)) from None
        if use_tqdm:
            from tqdm.auto import tqdm
            with tqdm(total=sum(map(len, positions)), desc=task.value, unit="prompt") as bar:
                for future, places in zip(futures, positions):
                    future.result()
                    bar.update(len(places))
        return [(f.result(), places) for f, places in zip(futures, positions)]


def _embeddings(out: Output) -> list[EmbeddingOutput]:
    if isinstance(out, MultiEmbedOutput):
        count = len(out.token_ids)
        return [EmbeddingOutput(
            out.dense[i].tolist() if out.dense is not None else [],
            out.sparse[i] if out.sparse is not None else None,
            torch.from_numpy(out.multi_vector[i]) if out.multi_vector is not None else None)
            for i in range(count)]
    if isinstance(out, SparseEmbedOutput):
        return [EmbeddingOutput(v.dense(out.vocab_size).tolist(), v) for v in out.vectors]
    return [EmbeddingOutput(row.tolist()) for row in out.embeddings]


def _lora_specs(loras) -> tuple[LoraSpec, ...]:
    """LLM(loras=...): {name: path}, or LoraSpecs, "NAME=PATH" strings or LoRARequests."""
    if isinstance(loras, dict):
        return tuple(LoraSpec(str(name), str(path)) for name, path in loras.items())
    specs = []
    for item in loras:
        if isinstance(item, LoraSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(LoraSpec.parse(item))
        elif hasattr(item, "lora_name") and getattr(item, "lora_path", ""):
            specs.append(LoraSpec(item.lora_name, str(item.lora_path)))
        else:
            raise ValueError(f"loras takes {{name: path}}, 'NAME=PATH' strings or LoRARequests "
                             f"with a lora_path; got {item!r}")
    return tuple(specs)


def _adapter_name(lora_request) -> str:
    """A call's lora_request as the adapter's name: "" (the base model) for None."""
    if lora_request is None:
        return ""
    if isinstance(lora_request, str):
        return lora_request
    name = getattr(lora_request, "lora_name", None)
    if not isinstance(name, str):
        raise ValueError(f"lora_request takes an adapter's name or a LoRARequest; got "
                         f"{lora_request!r}")
    return name


def _vllm_arguments(kwargs: dict) -> dict:
    """LLM keyword arguments in poolsvc's spelling (vLLM's dtype names, max_model_len ...)."""
    out = dict(kwargs)
    if "dtype" in out:
        name = str(out["dtype"]).removeprefix("torch.")
        out["dtype"] = _DTYPES.get(name, name)
    for name, harmless in _VLLM_NO_OPS.items():
        if name in out:
            value = out.pop(name)
            if harmless is not None and value != harmless:
                raise ValueError(f"LLM({name}={value!r}) is not supported by poolsvc; leave it "
                                 f"at {harmless!r}")
    return out


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


def _params(pooling_params, count: int) -> list[PoolingParams]:
    """One PoolingParams for every prompt, or vLLM's list with one per prompt."""
    if pooling_params is None:
        return [PoolingParams()]
    if isinstance(pooling_params, PoolingParams):
        return [pooling_params]
    params = list(pooling_params)
    if len(params) != count or not all(isinstance(p, PoolingParams) for p in params):
        raise ValueError(f"pooling_params must be one PoolingParams or a list of one per prompt "
                         f"({count}); got {len(params)} items")
    return params


def _slices(inputs: list, documents: list | None, members: list[int]):
    """(queries, documents, positions in the call) of each request a call becomes: slices of
    the prompts `members`, or for scores slices of the pairs (1:N slices the documents, N:1 and
    N:N the queries, in step)."""
    if documents is None:
        for start in range(0, len(members), _SLICE):
            places = members[start:start + _SLICE]
            yield tuple(inputs[i] for i in places), (), places
    elif len(inputs) == 1:
        for start in range(0, max(len(documents), 1), _SLICE):
            places = list(range(start, min(start + _SLICE, len(documents))))
            yield tuple(inputs), tuple(documents[start:start + _SLICE]), places
    else:
        for start in range(0, max(len(inputs), 1), _SLICE):
            places = list(range(start, min(start + _SLICE, len(inputs))))
            docs = documents if len(documents) == 1 else documents[start:start + _SLICE]
            yield tuple(inputs[start:start + _SLICE]), tuple(docs), places


def _truncation(truncate_prompt_tokens: int | None, params: PoolingParams,
                tokenization_kwargs: dict | None) -> Truncation:
    """vLLM's three ways to ask for truncation: the call's truncate_prompt_tokens, the
    PoolingParams' one, and tokenization_kwargs={"truncation": True, "max_length": k}."""
    asked = {v for v in (truncate_prompt_tokens, params.truncate_prompt_tokens) if v is not None}
    if tokenization_kwargs:
        if unknown := sorted(set(tokenization_kwargs) - {"truncation", "max_length"}):
            raise ValueError(f"tokenization_kwargs {unknown} are not supported; poolsvc takes "
                             "truncation and max_length (or truncate_prompt_tokens)")
        if tokenization_kwargs.get("truncation") is False:
            if asked:
                raise ValueError("tokenization_kwargs truncation=False contradicts "
                                 "truncate_prompt_tokens; drop one")
            return Truncation(enabled=False)
        if tokenization_kwargs.get("truncation"):
            asked.add(int(tokenization_kwargs.get("max_length") or -1))
    if len(asked) > 1:
        raise ValueError(f"conflicting truncation lengths {sorted(asked)}; give one")
    if not asked:
        return Truncation()
    length = asked.pop()
    if length == 0 or length < -1:
        raise ValueError(f"truncate_prompt_tokens must be positive, or -1 for the model's "
                         f"maximum; got {length}")
    return Truncation(enabled=True, max_tokens=length)


def _wrap(cls, outs: list[tuple[Output, list[int]]], results) -> list:
    """vLLM's per-prompt objects, in the call's order."""
    wrapped: dict[int, object] = {}
    for out, places in outs:
        for place, result, ids in zip(places, results(out), out.token_ids):
            wrapped[place] = cls(str(next(_ids)), result, ids)
    return [wrapped[i] for i in sorted(wrapped)]


__all__ = ["LLM", "LoRARequest", "PoolingOutput", "EmbeddingOutput", "ClassificationOutput",
           "ScoringOutput",
           "PoolingRequestOutput", "EmbeddingRequestOutput", "ClassificationRequestOutput",
           "ScoringRequestOutput", "PoolingParams"]
