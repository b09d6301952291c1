"""The engine's front: takes a PoolingRequest, resolves its pooling and tokenizes it on the
caller's thread, queues its sequences for the runner, and hands back a concurrent.futures.Future
of its output. Validation errors raise here, before anything is queued."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence as Seq
from concurrent.futures import Future

import torch
from tokenizers import Encoding

from poolsvc.engine.admission import Admission, Ticket
from poolsvc.engine.config import ConfigError, EngineConfig, Limits
from poolsvc.engine.description import Kind, ModelDescription
from poolsvc.engine.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    TooLargeError,
    UnavailableError,
    quoted,
)
from poolsvc.engine.inputs import model_inputs
from poolsvc.engine.loader import load_model
from poolsvc.engine.outputs import response_bytes
from poolsvc.engine.params import PromptOptions, Task, Truncation
from poolsvc.engine.pooler import options_for
from poolsvc.engine.request import PoolingRequest
from poolsvc.engine.runner import BatchObserver, ModelRunner, WorkQueue
from poolsvc.engine.served import ServedModel
from poolsvc.engine.state import Request

log = logging.getLogger(__name__)


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
    def __init__(self, config: EngineConfig, limits: Limits = Limits(),
                 on_batch: BatchObserver | None = None):
        self.config = config
        self.limits = limits
        self._models: dict[str, ServedModel] = {}  # by name and alias
        self._served: list[ServedModel] = []        # the default first
        self._queue = WorkQueue(config.max_batch_tokens, config.max_batch_inputs)
        self._admission = Admission(limits)
        self._runner = ModelRunner(self._queue, self._observe(on_batch))
        self.ready = False

    def _observe(self, on_batch: BatchObserver | None) -> BatchObserver:
        def observe(model: str, seqs: int, tokens: int, seconds: float) -> None:
            self._admission.ran(tokens, seconds)  # the device's rate, for admission
            if on_batch is not None:
                on_batch(model, seqs, tokens, seconds)
        return observe

    def start(self) -> None:
        """Loads and warms up every model, then starts the runner (blocking: minutes for big
        models)."""
        threads = self.config.threads or os.cpu_count() or 1
        # Only the runner thread computes with `threads` threads (warm-up included); loading
        # here runs on one. With an OpenMP team on this thread as well, libgomp stops spinning
        # between parallel regions, and each region of the runner pays a wake-up: a short
        # text's forward took 5.8 ms instead of 3.5 (docs/benchmarks.md).
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, device)
        for i, spec in enumerate(self.config.models):
            model = load_model(spec, device, dtype, is_default=i == 0,
                               pooler_config=self.config.pooler_config(spec.name),
                               allow_pickle=self.config.allow_pickle_weights,
                               use_kernels=not self.config.disable_kernels,
                               max_model_len=self.config.max_model_len,
                               adapters=self.config.loras if i == 0 else ())
            longest = model.description.max_input_tokens
            if longest > self.config.max_batch_tokens:
                raise ConfigError(
                    f"--max-batch-tokens {self.config.max_batch_tokens} is below {model.name}'s "
                    f"{longest}-token input limit: a longest input would never fit")
            adapters = tuple(a.name for a in model.description.adapters)
            if clash := sorted(set(adapters) & set(self._models)):
                raise ConfigError(f"--lora names {clash} are also names of a served model; "
                                  "name adapters apart")
            # an adapter's name selects its model too (vLLM serves LoRA modules as models)
            for key in (model.name, *model.description.aliases, *adapters):
                self._models.setdefault(key, model)
            self._served.append(model)
        torch.set_num_threads(caller_threads)
        self._runner.start(threads, pipelined=device.type != "cpu", first=self._warm_up)
        self.ready = True

    def _warm_up(self) -> None:
        """On the runner's thread, with its threads (the kernels and rate they will run with):
        each model warmed up, and timed on a batch as a backlog would make it, a first rate
        for admission before any traffic."""
        for model in self._served:
            model.warm_up()
            self._admission.ran(*model.time_one_batch(min(4096, self.config.max_batch_tokens)))

    def shutdown(self, discard: bool = False) -> None:
        """Stops taking requests. The runner finishes what is queued, or with `discard` only the
        batch on the device (its callers are gone), then its threads exit."""
        self.ready = False
        self._queue.close(discard)
        self._runner.join()

    def describe(self) -> list[ModelDescription]:
        """What each served model is and serves, the default first."""
        return [m.description for m in self._served]

    def model(self, name: str) -> ModelDescription:
        return self.served(name).description

    def held(self):
        """A context in which the runner takes no new batch (work queues up meanwhile)."""
        return self._queue.held()

    @property
    def stats(self) -> dict[str, int | float]:
        """Counters since start (batches, sequences and tokens run; expired sequences dropped),
        and now: requests in flight, sequences waiting, the estimated seconds of work admitted."""
        counters = dict.fromkeys(("batches", "sequences", "tokens", "expired"), 0)
        return {**counters, **self._queue.stats, "in_flight": self._admission.in_flight,
                "queued": self._queue.depth, "queued_seconds": self._admission.queued_seconds}

    def admit(self, deadline_ns: int | None = None) -> Ticket:
        """Admits a request before any work is done on it (the server: before decoding it), or
        raises OverloadedError at once. Pass the ticket to `submit`; it is released when the
        request is answered."""
        if not self.ready:
            raise UnavailableError("the server is not serving (loading or shutting down); retry")
        return self._admission.admit(deadline_ns)

    def release(self, ticket: Ticket) -> None:
        """Gives back a ticket whose request was never submitted."""
        self._admission.release(ticket)

    # --- requests --------------------------------------------------------------------------------

    def submit(self, request: PoolingRequest, ticket: Ticket | None = None) -> Future:
        """A future of the request's output (EmbedOutput, ClassifyOutput, ScoreOutput, or for
        `raw` requests EncodeOutput). `ticket`: from `admit`; without one the request is
        admitted here."""
        ticket = ticket or self.admit(request.deadline_ns)
        try:
            return self._submit(request, ticket)
        except BaseException:
            self._admission.release(ticket)
            raise

    def _submit(self, request: PoolingRequest, ticket: Ticket) -> Future:
        if not self.ready:
            raise UnavailableError("the server is not serving (loading or shutting down); retry")
        model, adapter = self._target(request)
        desc = model.description
        options = options_for(request, desc)
        inputs = model_inputs(model, request, self.limits, self.config.auto_truncate)
        cosine = request.task is Task.SCORE and desc.scores_by_cosine
        late = model.late_interaction
        logit = desc.logit_scale_and_bias if cosine and desc.kind is Kind.DUAL_ENCODER and \
            request.params.activation is False else None
        # each query and document embedded once, then paired (cosine or MaxSim)
        embedded = request.task is Task.SCORE and (cosine or late is not None)
        pairs = tuple((q, len(request.inputs) + d) for q, d in request.pairs) if embedded else ()
        maxsim = ("mean" if late.mean else "sum") if late is not None and embedded else None
        state = Request(request, model.name, options, inputs.token_ids, inputs.token_type_ids,
                        inputs.pixels, desc.image_tokens,
                        chunk_size=desc.chunk_size if request.task is Task.EMBED else None,
                        labels=desc.labels, pairs=pairs, logit=logit,
                        token_strings=model.tokenizer.token_strings
                        if request.sparse.return_tokens else None, offsets=inputs.offsets,
                        attended=inputs.attended, kept=inputs.kept, maxsim=maxsim,
                        m3=model.m3 if options.outputs is not None else None, adapter=adapter)
        limit = self.limits.max_response_bytes
        if limit is not None and (size := response_bytes(state, desc)) > limit:
            raise TooLargeError(
                f"the response would be {size / 2**20:.1f} MiB, more than the server's limit of "
                f"{limit / 2**20:.1f} MiB (--max-message-bytes): send fewer inputs, or ask for "
                "a smaller output (dimensions, output_dtype)")
        self._admission.counted_as(ticket, state.num_tokens, request.deadline_ns)
        return self._enqueue(model, state, ticket)

    def tokenize(self, model_name: str, texts: Seq[str], truncation: Truncation = Truncation(),
                 prompt: PromptOptions = PromptOptions(), add_special_tokens: bool = True,
                 offsets: bool = False) -> tuple[ModelDescription, list[Encoding]]:
        model = self.served(model_name)
        if not texts:
            raise InvalidInputError("the request has no texts; send at least one")
        self.limits.check_inputs(len(texts))
        prefix = model.tokenizer.prompt_text(prompt)
        self.limits.check_texts(texts, prefix)
        limit, cut = truncation.limit(model.description.max_input_tokens,
                                      self.config.auto_truncate)
        return model.description, model.tokenizer.encode(
            [prefix + t for t in texts], limit, cut, truncation.side,
            add_special_tokens=add_special_tokens, offsets=offsets)

    def _target(self, request: PoolingRequest) -> tuple[ServedModel, int]:
        """The model a request runs on and the slot of its LoRA adapter (0: none). `model` may
        name an adapter, as vLLM serves LoRA modules under their own names."""
        model = self.served(request.model)
        named = request.model if request.model in (
            a.name for a in model.description.adapters) else ""
        if named and request.adapter and request.adapter != named:
            raise InvalidInputError(f"model names adapter {quoted(named)} and adapter names "
                                    f"{quoted(request.adapter)}: name one")
        return model, model.description.adapter_slot(request.adapter or named)

    def served(self, name: str) -> ServedModel:
        """The loaded model `name` (its backend, tokenizer and device work)."""
        if not self._served:
            raise UnavailableError("the server is still loading its models; retry shortly")
        if not name:
            return self._served[0]
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(m.name for m in self._served)
            adapters = ", ".join(a.name for m in self._served for a in m.description.adapters)
            raise ModelNotFoundError(
                f"model {quoted(name)} is not served here; served: {known}"
                + (f"; adapters: {adapters}" if adapters else "")) from None

    def _enqueue(self, model: ServedModel, state: Request, ticket: Ticket) -> Future:
        deadline = state.deadline_ns
        if deadline is not None and deadline <= state.tokenized_ns:
            raise DeadlineExceededError("the deadline passed during tokenization; nothing was "
                                        "computed")
        seqs = state.sequences()
        state.future.add_done_callback(lambda _: self._admission.release(ticket))
        try:
            self._queue.put(model, seqs)
        except BaseException:
            state.future.cancel()
            raise
        return state.future
