"""The engine's front: validates and tokenizes requests on the caller's thread, queues them for
the runner thread, and hands back a concurrent.futures.Future per request."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence as Seq
from concurrent.futures import Future

import torch
from tokenizers import Encoding

from poolsvc.config import ConfigError, ServerConfig
from poolsvc.engine.errors import InvalidInputError, ModelNotFoundError, UnavailableError
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import EmbedParams, PromptOptions, Task, Truncation
from poolsvc.engine.request import Request, now_ns
from poolsvc.engine.runner import ModelRunner, WorkQueue
from poolsvc.engine.served import ServedModel, load_served_model

log = logging.getLogger(__name__)

# An input is text, or token ids from the model's tokenizer.
Prompt = str | Seq[int]


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
    def __init__(self, config: ServerConfig):
        self.config = config
        self._models: dict[str, ServedModel] = {}  # by name and alias
        self._served: list[ServedModel] = []        # the default first
        self._queue = WorkQueue(config.max_batch_tokens, config.max_batch_inputs)
        self._runner = ModelRunner(self._queue)
        self.ready = False

    def start(self) -> None:
        """Loads and warms up every model, then starts the runner (blocking: minutes for big
        models)."""
        torch.set_num_threads(self.config.threads or os.cpu_count() or 1)
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, device)
        for i, spec in enumerate(self.config.models):
            model = load_served_model(spec, device, dtype, self.config.allow_pickle_weights,
                                      is_default=i == 0)
            if model.max_input_tokens > self.config.max_batch_tokens:
                raise ConfigError(
                    f"--max-batch-tokens {self.config.max_batch_tokens} is below {model.name}'s "
                    f"{model.max_input_tokens}-token input limit: a longest input would never fit")
            for key in (model.name, *model.aliases):
                self._models.setdefault(key, model)
            self._served.append(model)
            _warm_up(model)
        self._runner.start()
        self.ready = True

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops taking requests; the runner finishes what is queued, then exits."""
        self.ready = False
        self._queue.close()
        self._runner.join(timeout)

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

    def embed(self, model_name: str, inputs: Seq[Prompt], params: EmbedParams = EmbedParams(),
              truncation: Truncation = Truncation(), prompt: PromptOptions = PromptOptions(),
              arrival_ns: int | None = None) -> Future:
        """Future of an EmbedOutput. Validation errors raise here, before anything is queued."""
        arrival_ns = arrival_ns or now_ns()
        model = self._ready_model(model_name)
        _check_dimensions(model, params.dimensions)
        token_ids = self._tokenize(model, inputs, truncation, prompt)
        req = Request(model=model, task=Task.EMBED, params=params, token_ids=token_ids,
                      arrival_ns=arrival_ns, tokenized_ns=now_ns())
        self._queue.put(req.sequences())
        return req.future

    def tokenize(self, model_name: str, texts: Seq[str], truncation: Truncation = Truncation(),
                 prompt: PromptOptions = PromptOptions(), add_special_tokens: bool = True,
                 offsets: bool = False) -> tuple[ServedModel, list[Encoding]]:
        model = self.model(model_name)
        if not texts:
            raise InvalidInputError("the request has no texts; send at least one")
        limit, cut = truncation.limit(model.max_input_tokens, self.config.auto_truncate)
        prefix = model.tokenizer.prompt_text(prompt)
        return model, model.tokenizer.encode(
            [prefix + t for t in texts], limit, cut, truncation.side,
            add_special_tokens=add_special_tokens, offsets=offsets)

    def _ready_model(self, name: str) -> ServedModel:
        if not self.ready:
            raise UnavailableError("the server is not serving (loading or shutting down); retry")
        return self.model(name)

    def _tokenize(self, model: ServedModel, inputs: Seq[Prompt], truncation: Truncation,
                  prompt: PromptOptions) -> list[list[int]]:
        if not inputs:
            raise InvalidInputError("the request has no inputs; send at least one")
        limit, cut = truncation.limit(model.max_input_tokens, self.config.auto_truncate)
        tok = model.tokenizer
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        out: list[list[int]] = [[] for _ in inputs]
        if len(texts) < len(inputs):
            if prompt.name or prompt.text:
                raise InvalidInputError("a prompt applies to text inputs only: token-id inputs "
                                        "must already contain it")
            for i, x in enumerate(inputs):
                if not isinstance(x, str):
                    out[i] = tok.check_ids(x, i, limit, cut, truncation.side)
        if texts:
            prefix = tok.prompt_text(prompt)
            index = [i for i, _ in texts]
            encodings = tok.encode([prefix + x for _, x in texts], limit, cut, truncation.side,
                                   indices=index)
            for i, enc in zip(index, encodings):
                out[i] = enc.ids
        return out


def _check_dimensions(model: ServedModel, dimensions: int | None) -> None:
    if dimensions is None:
        return
    allowed = model.files.matryoshka_dimensions
    if not 1 <= dimensions <= model.hidden_size:
        raise InvalidInputError(f"dimensions must be between 1 and {model.hidden_size} for "
                                f"{model.name}, got {dimensions}")
    if allowed and dimensions not in allowed:
        raise InvalidInputError(f"{model.name} supports dimensions "
                                f"{', '.join(map(str, allowed))}; got {dimensions}")


def _warm_up(model: ServedModel) -> None:
    """One short and one longest input, so first requests do not pay for lazy initialization."""
    lengths = [8, model.max_input_tokens]
    ids = [[0] * n for n in lengths]
    model.embed(PackedBatch.build(ids, None, model.device, model.module.position_offset))
