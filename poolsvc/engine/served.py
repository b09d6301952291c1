"""A loaded model on its device: its backend, heads and tokenizer, and the device work of a batch
(pack its tensors, run the forward pass, pool each set of options; hand host rows back)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from poolsvc.engine import cpu
from poolsvc.engine.backend import ModelBackend
from poolsvc.engine.bge_m3 import M3Layout
from poolsvc.engine.description import Kind, ModelDescription
from poolsvc.engine.late_interaction import LateInteractionEncoder
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import Task
from poolsvc.engine.pooler import DenseHead, Head, PoolerOptions, finish_rows, options_for, pool
from poolsvc.engine.request import PoolingRequest
from poolsvc.engine.state import Request, Sequence
from poolsvc.engine.tokenizer import TextTokenizer


@dataclass(frozen=True)
class HostRows:
    """A batch's pooled outputs, one per sequence in batch order, on their way to the host.
    On CUDA the copies are asynchronous: `wait()` before reading them."""

    rows: list[torch.Tensor]
    copied: torch.cuda.Event | None = None

    def wait(self) -> list[torch.Tensor]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.rows


@dataclass(eq=False)
class ServedModel:
    description: ModelDescription
    backend: ModelBackend
    dense: DenseHead | None
    tokenizer: TextTokenizer
    device: torch.device
    dtype: torch.dtype
    use_kernels: bool = False  # Triton kernels for pooling (and the backend's fused layers)
    # Multi-vector models: each side's markers, expansion and skip-list (tokenizer-resolved)
    late_interaction: LateInteractionEncoder | None = None
    m3: M3Layout | None = None  # BGE-M3: how its rows unpack

    @property
    def name(self) -> str:
        return self.description.name

    def preprocess(self, images: list) -> list[torch.Tensor]:
        """Decoded images -> [3, H, W] pixels, by the checkpoint's own processor."""
        return self.backend.preprocess(images)

    # --- device work -----------------------------------------------------------------------------

    def prepare(self, seqs: list[Sequence]) -> PackedBatch:
        """A batch's device tensors (built while the previous batch runs)."""
        types = None
        if any(s.token_type_ids is not None for s in seqs):
            types = [s.token_type_ids or [0] * s.num_tokens for s in seqs]
        pixels = [s.pixels for s in seqs] if any(s.pixels is not None for s in seqs) else None
        keys = None
        if any(s.attended is not None for s in seqs):
            keys = [s.num_tokens if s.attended is None else s.attended for s in seqs]
        adapters = [s.request.adapter for s in seqs]
        return PackedBatch.build([s.token_ids for s in seqs], types, self.device,
                                 self.backend.position_offset, pixels, self.dtype, keys, adapters)

    @torch.inference_mode()
    def compute(self, seqs: list[Sequence], batch: PackedBatch) -> HostRows:
        """One forward pass, then the pooler once per distinct set of options in the batch,
        each over only its own sequences."""
        hidden = self.backend(batch)  # [num_tokens, hidden] ([num_seqs, hidden]: dual encoders)
        groups: dict[PoolerOptions, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(seq.options, []).append(i)
        outputs: list = [None] * len(seqs)
        for options, members in groups.items():
            index = None if len(members) == len(seqs) else \
                torch.tensor(members, device=self.device)
            if self.description.kind is Kind.DUAL_ENCODER:  # the towers pooled: finish only
                rows, counts = finish_rows(hidden if index is None else hidden[index],
                                           options), None
            else:
                rows, counts = pool(hidden, batch, index, options, self._head(options.head),
                                    self.use_kernels)
            rows = rows.to("cpu", non_blocking=True)  # pinned, asynchronous on CUDA
            parts = rows.split(counts) if counts is not None else rows.unbind()
            for i, part in zip(members, parts):
                outputs[i] = part
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        return HostRows(outputs, copied)

    def _head(self, head: Head) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if head is Head.DENSE:
            return self.dense
        if head is Head.MODEL:
            return lambda rows: self.backend.head(rows.to(self.dtype))  # [rows, num_labels]
        if head is Head.M3:
            return self.backend.rows
        return None

    def warm_up(self) -> None:
        """Every task's pooling once, and the oneDNN products' kernels for short batches (CPU),
        so first requests do not pay for lazy initialization. Run it on the thread that
        computes, with its thread count: oneDNN builds kernels per thread count."""
        cpu.warm(self.backend)  # nothing to do for a model off the oneDNN path
        for task in self.description.tasks:
            request = self._sample(task)
            seqs = request.sequences()
            self.compute(seqs, self.prepare(seqs)).wait()

    def time_one_batch(self, tokens: int) -> tuple[int, float]:
        """(tokens, seconds) of a batch of about `tokens` (longest inputs) through the forward
        pass and pooling: a first measure of the device's rate, before any traffic."""
        model = self.description
        count = max(1, tokens // model.max_input_tokens)
        request = self._sample(model.default_task)
        if "image" not in model.modalities:
            call = PoolingRequest(model.default_task, ("",) * count)
            request = Request(call, self.name, options_for(call, model),
                              [[0] * model.max_input_tokens] * count)
        seqs = request.sequences()
        started = time.perf_counter()
        self.compute(seqs, self.prepare(seqs)).wait()
        return request.num_tokens, time.perf_counter() - started

    def _sample(self, task: Task) -> Request:
        """A short and a longest input (an image instead, for image models) for `task`."""
        model = self.description
        ids, pixels = [[0] * 8, [0] * model.max_input_tokens], None
        if "image" in model.modalities:
            from PIL import Image
            ids, pixels = [[0] * 8, []], [None, *self.preprocess([Image.new("RGB", (32, 32))])]
        call = PoolingRequest(task, ("",), ("",) if task is Task.SCORE else ())
        return Request(call, self.name, options_for(call, model), ids, pixels=pixels,
                       image_tokens=model.image_tokens)
