"""The engine's front: validates and tokenizes requests on the caller's thread, queues them for
the runner thread, and hands back a concurrent.futures.Future per request."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from tokenizers import Encoding

from poolsvc.config import ConfigError, ServerConfig
from poolsvc.engine import tasks
from poolsvc.engine.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
)
from poolsvc.engine.images import ImageInput, decode
from poolsvc.engine.params import PoolingParams, PromptOptions, Task, Truncation
from poolsvc.engine.request import Plan, Request, now_ns
from poolsvc.engine.runner import BatchObserver, ModelRunner, WorkQueue
from poolsvc.engine.served import Kind, ServedModel, load_served_model

log = logging.getLogger(__name__)

# An input is text, or token ids from the model's tokenizer.
Prompt = str | Seq[int]
_NO_PROMPT = PromptOptions()


@dataclass(frozen=True)
class Clock:
    """When a request arrived (for its timing) and when its caller stops waiting (None: never;
    work still queued then is dropped, not computed)."""

    arrival_ns: int = field(default_factory=now_ns)
    deadline_ns: int | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Engine:
    def __init__(self, config: ServerConfig, on_batch: BatchObserver | None = None):
        self.config = config
        self._models: dict[str, ServedModel] = {}  # by name and alias
        self._served: list[ServedModel] = []        # the default first
        self._queue = WorkQueue(config.max_batch_tokens, config.max_batch_inputs)
        self._runner = ModelRunner(self._queue, on_batch)
        self._in_flight = 0  # requests admitted and not yet answered
        self._admission = threading.Lock()
        self.ready = False

    def start(self) -> None:
        """Loads and warms up every model, then starts the runner (blocking: minutes for big
        models)."""
        threads = self.config.threads or os.cpu_count() or 1
        # Only the runner thread computes with `threads` threads; loading and warm-up here run
        # on one. With an OpenMP team on this thread as well, libgomp stops spinning between
        # parallel regions, and each region of the runner pays a wake-up: a short text's forward
        # took 5.8 ms instead of 3.5 (docs/benchmarks.md).
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, device)
        for i, spec in enumerate(self.config.models):
            model = load_served_model(spec, device, dtype, self.config.allow_pickle_weights,
                                      is_default=i == 0,
                                      pooler_config=self.config.pooler_config(spec.name),
                                      quantize=self.config.quantize,
                                      use_kernels=not self.config.disable_kernels)
            if model.max_input_tokens > self.config.max_batch_tokens:
                raise ConfigError(
                    f"--max-batch-tokens {self.config.max_batch_tokens} is below {model.name}'s "
                    f"{model.max_input_tokens}-token input limit: a longest input would never fit")
            for key in (model.name, *model.aliases):
                self._models.setdefault(key, model)
            self._served.append(model)
            model.warm_up()
        torch.set_num_threads(caller_threads)
        self._runner.start(threads)
        self.ready = True

    def shutdown(self, discard: bool = False) -> None:
        """Stops taking requests. The runner finishes what is queued, or with `discard` only the
        batch on the device (its callers are gone), then its threads exit."""
        self.ready = False
        self._queue.close(discard)
        self._runner.join()

    def models(self) -> list[ServedModel]:
        return list(self._served)

    def model(self, name: str) -> ServedModel:
        if not self._served:
            raise UnavailableError("the server is still loading its models; retry shortly")
        if not name:
            return self._served[0]
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(m.name for m in self._served)
            raise ModelNotFoundError(
                f"model {name!r} is not served here; served: {known}") from None

    # --- tasks -----------------------------------------------------------------------------------

    def embed(self, model_name: str, inputs: Seq[Prompt], params: PoolingParams = PoolingParams(),
              truncation: Truncation = Truncation(), prompt: PromptOptions = _NO_PROMPT,
              clock: Clock | None = None) -> Future:
        """Future of an EmbedOutput. Validation errors raise here, before anything is queued."""
        clock = clock or Clock()
        model = self._model_for(model_name, Task.EMBED)
        _reject(params, activation="embed")
        _check_dimensions(model, params.dimensions)
        plan = Plan(Task.EMBED, model.pooler(Task.EMBED), tasks.finish_embed,
                    normalize=_pick(params.normalize, model.normalize_default),
                    dimensions=params.dimensions, out_dtype=params.out_dtype)
        chunk = model.pooler_config.enable_chunked_processing
        token_ids, pixels = self._tokenize(model, inputs, truncation, prompt, chunked=chunk)
        return self._submit(model, plan, token_ids, None, clock,
                            chunk_size=model.max_input_tokens if chunk else None, pixels=pixels)

    def classify(self, model_name: str, inputs: Seq[Prompt],
                 params: PoolingParams = PoolingParams(), truncation: Truncation = Truncation(),
                 prompt: PromptOptions = _NO_PROMPT, clock: Clock | None = None) -> Future:
        """Future of a ClassifyOutput."""
        clock = clock or Clock()
        model = self._model_for(model_name, Task.CLASSIFY)
        _reject(params, normalize="classify", dimensions="classify")
        plan = Plan(Task.CLASSIFY, model.pooler(Task.CLASSIFY), tasks.finish_classify,
                    activation=model.activation(Task.CLASSIFY, params.activation),
                    out_dtype=params.out_dtype)
        token_ids, _ = self._tokenize(model, inputs, truncation, prompt)
        return self._submit(model, plan, token_ids, None, clock)

    def score(self, model_name: str, queries: Seq[Prompt], documents: Seq[Prompt],
              params: PoolingParams = PoolingParams(), truncation: Truncation = Truncation(),
              clock: Clock | None = None) -> Future:
        """Future of a ScoreOutput: a cross-encoder's score of each pair, or the cosine of the
        two embeddings for embedding models. Pairs are 1:N, N:1 or N:N (zipped)."""
        clock = clock or Clock()
        model = self._model_for(model_name, Task.SCORE)
        _reject(params, normalize="score", dimensions="score")
        pairs = _pairs(len(queries), len(documents))
        if model.kind in (Kind.EMBEDDING, Kind.DUAL_ENCODER):  # embed each input once, cosine
            n = len(queries)
            # CLIP / SigLIP: activation=false asks for the model's logits (scaled, biased cosine)
            logit = model.module.logit_scale_and_bias() \
                if model.kind is Kind.DUAL_ENCODER and params.activation is False else None
            plan = Plan(Task.SCORE, model.pooler(Task.SCORE), tasks.finish_cosine_score,
                        normalize=True, pairs=tuple((q, n + d) for q, d in pairs), logit=logit)
            token_ids, pixels = self._tokenize(model, [*queries, *documents], truncation,
                                               _NO_PROMPT, count=len(pairs))
            return self._submit(model, plan, token_ids, None, clock, pixels=pixels)
        texts = [*queries, *documents]
        self._check_limits(texts, len(pairs))
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInputError(f"cross-encoder {model.name} scores text pairs: token-id "
                                    "inputs cannot be paired with the model's separators")
        limit, cut = truncation.limit(model.max_input_tokens, self.config.auto_truncate)
        encodings = model.tokenizer.encode_pairs(
            [(queries[q], documents[d]) for q, d in pairs], limit, cut, truncation.side)
        plan = Plan(Task.SCORE, model.pooler(Task.SCORE), tasks.finish_cross_score,
                    activation=model.activation(Task.SCORE, params.activation))
        return self._submit(model, plan, [e.ids for e in encodings],
                            [e.type_ids for e in encodings] if model.uses_token_types else None,
                            clock)

    def encode(self, model_name: str, inputs: Seq[Prompt], task: Task | None = None,
               params: PoolingParams = PoolingParams(), truncation: Truncation = Truncation(),
               prompt: PromptOptions = _NO_PROMPT, clock: Clock | None = None) -> Future:
        """Future of an EncodeOutput: the raw output of `task` (default: the model's per-token
        task) per input."""
        clock = clock or Clock()
        model = self._ready_model(model_name)
        task = task or model.default_task
        model.check_task(task)
        if task is Task.SCORE:
            raise InvalidInputError("Encode does not run score: use Score or Rerank")
        embedding = task in (Task.EMBED, Task.TOKEN_EMBED)
        _reject(params, dimensions="encode",
                **({"activation": task.value} if embedding else {"normalize": task.value}))
        if embedding:
            plan = Plan(task, model.pooler(task), tasks.finish_encode,
                        normalize=_pick(params.normalize, model.normalize_default),
                        out_dtype=params.out_dtype)
        else:
            plan = Plan(task, model.pooler(task), tasks.finish_encode,
                        activation=model.activation(task, params.activation),
                        out_dtype=params.out_dtype,
                        returned_token_ids=model.pooler_config.returned_token_ids)
        token_ids, _ = self._tokenize(model, inputs, truncation, prompt)
        return self._submit(model, plan, token_ids, None, clock)

    def tokenize(self, model_name: str, texts: Seq[str], truncation: Truncation = Truncation(),
                 prompt: PromptOptions = _NO_PROMPT, add_special_tokens: bool = True,
                 offsets: bool = False) -> tuple[ServedModel, list[Encoding]]:
        model = self.model(model_name)
        if not texts:
            raise InvalidInputError("the request has no texts; send at least one")
        self._check_limits(texts)
        limit, cut = truncation.limit(model.max_input_tokens, self.config.auto_truncate)
        prefix = model.tokenizer.prompt_text(prompt)
        return model, model.tokenizer.encode(
            [prefix + t for t in texts], limit, cut, truncation.side,
            add_special_tokens=add_special_tokens, offsets=offsets)

    # --- shared steps ----------------------------------------------------------------------------

    def _ready_model(self, name: str) -> ServedModel:
        if not self.ready:
            raise UnavailableError("the server is not serving (loading or shutting down); retry")
        return self.model(name)

    def _model_for(self, name: str, task: Task) -> ServedModel:
        model = self._ready_model(name)
        model.check_task(task)
        return model

    def _submit(self, model: ServedModel, plan: Plan, token_ids: list[list[int]],
                token_type_ids: list[list[int]] | None, clock: Clock,
                chunk_size: int | None = None,
                pixels: list[torch.Tensor | None] | None = None) -> Future:
        tokenized = now_ns()
        if clock.deadline_ns is not None and clock.deadline_ns <= tokenized:
            raise DeadlineExceededError("the deadline passed during tokenization; nothing was "
                                        "computed")
        with self._admission:
            limit = self.config.max_concurrent_requests
            if self._in_flight >= limit:
                raise OverloadedError(
                    f"{self._in_flight} requests are in flight, the server's limit "
                    f"(--max-concurrent-requests {limit}); retry with backoff or on another "
                    "replica")
            self._in_flight += 1
        req = Request(model=model, plan=plan, token_ids=token_ids, token_type_ids=token_type_ids,
                      arrival_ns=clock.arrival_ns, tokenized_ns=tokenized, chunk_size=chunk_size,
                      deadline_ns=clock.deadline_ns, pixels=pixels,
                      image_tokens=model.image_tokens)
        req.future.add_done_callback(self._release)
        try:
            self._queue.put(req.sequences())
        except BaseException:
            req.future.cancel()
            raise
        return req.future

    def _release(self, _future: Future) -> None:
        with self._admission:
            self._in_flight -= 1

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start (batches, sequences and tokens run; expired sequences dropped),
        and now: requests in flight, sequences waiting."""
        return {**self._queue.stats, "in_flight": self._in_flight, "queued": self._queue.depth}

    def _check_limits(self, inputs: Seq, count: int | None = None) -> None:
        """Request-size limits, before any tokenizing. `count`: what the input limit counts (the
        pairs of a score request), when not the inputs themselves."""
        limit = self.config.max_inputs_per_request
        count = len(inputs) if count is None else count
        if count > limit:
            raise OverloadedError(f"the request has {count} inputs, more than the server's "
                                  f"limit of {limit} (--max-inputs-per-request): split it")
        chars = self.config.max_chars_per_input
        for i, x in enumerate(inputs):
            if isinstance(x, str) and len(x) > chars:
                raise OverloadedError(f"input {i} has {len(x)} characters, more than the "
                                      f"server's limit of {chars} (--max-chars-per-input)")

    def _tokenize(self, model: ServedModel, inputs: Seq[Prompt], truncation: Truncation,
                  prompt: PromptOptions, chunked: bool = False, count: int | None = None
                  ) -> tuple[list[list[int]], list[torch.Tensor | None] | None]:
        """Token ids per input, and pixels per input when some inputs are images (their token
        ids are empty)."""
        if not inputs:
            raise InvalidInputError("the request has no inputs; send at least one")
        self._check_limits(inputs, count)
        limit, cut = truncation.limit(model.max_input_tokens, self.config.auto_truncate)
        if chunked and not cut:  # long inputs are split into chunks instead of rejected
            limit = model.pooler_config.max_embed_len or 16 * model.max_input_tokens
        tok = model.tokenizer
        out: list[list[int]] = [[] for _ in inputs]
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        images = [(i, x) for i, x in enumerate(inputs) if isinstance(x, ImageInput)]
        for i, x in enumerate(inputs):
            if not isinstance(x, (str, ImageInput)):
                if prompt.name or prompt.text:
                    raise InvalidInputError("a prompt applies to text inputs only: token-id "
                                            "inputs must already contain it")
                out[i] = tok.check_ids(x, i, limit, cut, truncation.side)
        if texts:
            prefix = tok.prompt_text(prompt)
            index = [i for i, _ in texts]
            encodings = tok.encode([prefix + x for _, x in texts], limit, cut, truncation.side,
                                   indices=index)
            for i, enc in zip(index, encodings):
                out[i] = enc.ids
        if not images:
            return out, None
        if "image" not in model.modalities:
            raise InvalidInputError(f"input {images[0][0]} is an image, but model {model.name} "
                                    "accepts text only; serve an image model (CLIP, SigLIP)")
        decoded = [decode(x, i, self.config.max_image_bytes, self.config.max_image_pixels)
                   for i, x in images]
        pixels: list[torch.Tensor | None] = [None] * len(inputs)
        for (i, _), tensor in zip(images, model.preprocess(decoded)):
            pixels[i] = tensor
        return out, pixels


def _pick(requested: bool | None, default: bool) -> bool:
    return default if requested is None else requested


def _reject(params: PoolingParams, **fields: str) -> None:
    """Options that mean nothing for the task are errors, not silently ignored."""
    for name, task in fields.items():
        if getattr(params, name) is not None:
            raise InvalidInputError(f"{name} does not apply to {task}; leave it unset")


def _pairs(num_queries: int, num_documents: int) -> list[tuple[int, int]]:
    if num_queries == 0 or num_documents == 0:
        raise InvalidInputError(f"score needs at least one query and one document; got "
                                f"{num_queries} queries and {num_documents} documents")
    if num_queries == 1:
        return [(0, d) for d in range(num_documents)]
    if num_documents == 1:
        return [(q, 0) for q in range(num_queries)]
    if num_queries == num_documents:
        return [(i, i) for i in range(num_queries)]
    raise InvalidInputError(
        f"cannot pair {num_queries} queries with {num_documents} documents: send 1 query and N "
        "documents, N queries and 1 document, or N of each (zipped)")


def _check_dimensions(model: ServedModel, dimensions: int | None) -> None:
    if dimensions is None:
        return
    allowed = model.files.matryoshka_dimensions
    if not 1 <= dimensions <= model.embed_dimensions:
        raise InvalidInputError(f"dimensions must be between 1 and {model.embed_dimensions} for "
                                f"{model.name}, got {dimensions}")
    if allowed and dimensions not in allowed:
        raise InvalidInputError(f"{model.name} supports dimensions "
                                f"{', '.join(map(str, allowed))}; got {dimensions}")
