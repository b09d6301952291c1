"""A loaded model: its module on the device, its heads, tokenizer and serving defaults."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from poolsvc.config import ModelSpec, PoolerConfig
from poolsvc.engine import cpu, fused
from poolsvc.engine.errors import InvalidInputError, ModelLoadError
from poolsvc.engine.fused import kernels
from poolsvc.engine.loader import (
    DenseSpec,
    ModelFiles,
    fill_weights,
    load_state_dict,
    read_model_files,
    resolve,
)
from poolsvc.engine.models import ARCHITECTURES, dual, hf_fallback
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import Activation, PoolingType, Task
from poolsvc.engine.pooling import SEQUENCE_POOLERS, DenseHead, token_rows
from poolsvc.engine.quantize import quantize_int8
from poolsvc.engine.request import Sequence
from poolsvc.engine.tokenizer import TextTokenizer, load_hf_tokenizer

log = logging.getLogger(__name__)


# Sequence poolings the Triton pooling kernel implements.
_KERNEL_POOLING = (PoolingType.CLS, PoolingType.LAST, PoolingType.MEAN)


class Kind(enum.Enum):
    EMBEDDING = "embedding"    # a body: hidden states, pooled into embeddings
    DUAL_ENCODER = "dual-encoder"  # CLIP / SigLIP: text and image towers into one space
    CLASSIFIER = "classifier"  # a head on one pooled row per sequence
    REWARD = "reward"          # a head on every token


class Head(enum.Enum):
    NONE = "none"      # the pooled hidden states themselves
    DENSE = "dense"    # Sentence-Transformers Dense modules
    MODEL = "model"    # the checkpoint's classification / reward head


@dataclass(frozen=True)
class DevicePooler:
    """What the runner computes on the device for a sequence: rows -> head."""

    pooling: PoolingType
    head: Head
    step_tag_id: int | None = None


@dataclass(eq=False)
class ServedModel:
    name: str
    files: ModelFiles
    module: torch.nn.Module
    dense: DenseHead | None
    tokenizer: TextTokenizer
    device: torch.device
    dtype: torch.dtype
    max_input_tokens: int
    vocab_size: int
    is_default: bool
    pooler_config: PoolerConfig
    implementation: str  # "poolsvc" (own packed code) or "transformers" (the fallback)
    fused: bool = False  # Triton kernels for pooling (and the model's fused layers)

    # --- what the model is and serves -----------------------------------------------------------

    modalities = ("text",)
    image_tokens = 0  # what one image costs in the batch token budget (image models only)

    @property
    def kind(self) -> Kind:
        if not hasattr(self.module, "head"):
            return Kind.EMBEDDING
        return Kind.REWARD if self.module.head_pooling is PoolingType.ALL else Kind.CLASSIFIER

    @property
    def tasks(self) -> tuple[Task, ...]:
        if self.kind is Kind.EMBEDDING:
            return (Task.EMBED, Task.SCORE, Task.TOKEN_EMBED)
        if self.kind is Kind.REWARD:
            return (Task.REWARD, Task.TOKEN_CLASSIFY)
        tasks = [Task.CLASSIFY]
        if self.num_labels == 1:
            tasks.append(Task.SCORE)  # a cross-encoder
        if self.module.head_pooling is PoolingType.LAST:  # decoder heads read any token
            tasks.append(Task.TOKEN_CLASSIFY)
        return tuple(tasks)

    @property
    def default_task(self) -> Task:
        """The task Encode runs when a request names none: the raw per-token output if the
        model has one."""
        per_token = [t for t in self.tasks if t.per_token]
        return per_token[0] if per_token else self.tasks[0]

    def check_task(self, task: Task) -> None:
        if task not in self.tasks:
            raise InvalidInputError(
                f"model {self.name} ({self.kind.value}) does not serve {task.value}; it serves "
                f"{', '.join(t.value for t in self.tasks)}")

    @property
    def hidden_size(self) -> int:
        return self.module.hidden_size

    @property
    def embed_dimensions(self) -> int:
        return self.dense.out_features if self.dense is not None else self.hidden_size

    @property
    def num_labels(self) -> int:
        return self.module.num_labels if self.kind in (Kind.CLASSIFIER, Kind.REWARD) else 0

    @property
    def labels(self) -> list[str]:
        id2label = self.files.hf_config.get("id2label") or {}
        return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}")))
                for i in range(self.num_labels)]

    @property
    def uses_token_types(self) -> bool:
        """Whether pair encodings pass token type ids (BERT-style segment embeddings)."""
        return int(self.files.hf_config.get("type_vocab_size", 0) or 0) > 1

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(a for a in self.files.aliases if a != self.name)

    # --- pooling defaults, in precedence: server --pooler-config, model files, the model -------

    @property
    def pooling_type(self) -> PoolingType:
        """The pooling of sequence tasks (embed, classify, score); a reward model's per-token
        pooling, since it serves no sequence task."""
        if self.kind is Kind.REWARD:
            return self.token_pooling
        configured = self.pooler_config.pooling_type
        if configured is not None and not configured.per_token:
            return configured
        if self.kind is Kind.EMBEDDING:
            return self.files.pooling_type or self.module.default_pooling
        return self.module.head_pooling

    @property
    def token_pooling(self) -> PoolingType:
        return PoolingType.STEP if self.pooler_config.pooling_type is PoolingType.STEP \
            else PoolingType.ALL

    @property
    def normalize_default(self) -> bool:
        configured = self.pooler_config.normalize
        return self.files.normalize if configured is None else configured

    @property
    def classify_activation(self) -> Activation:
        problem = self.files.hf_config.get("problem_type")
        if problem == "regression":
            return Activation.IDENTITY
        if problem == "multi_label_classification" or self.num_labels == 1:
            return Activation.SIGMOID
        return Activation.SOFTMAX

    def activation(self, task: Task, requested: bool | None) -> Activation:
        """The activation a request gets: the request's choice, then the server's, then the
        task's default for this model."""
        wanted = requested if requested is not None else self.pooler_config.activation
        if task is Task.SCORE and self.files.score_activation is not None:
            default = self.files.score_activation  # a CrossEncoder's configured activation_fn
        elif task is Task.REWARD:
            # Outcome rewards are raw; process rewards per step are probabilities (vLLM's PRM).
            step = self.token_pooling is PoolingType.STEP
            default = Activation.SOFTMAX if step else Activation.IDENTITY
            if wanted is True and default is Activation.IDENTITY:
                return self.classify_activation
        else:
            default = self.classify_activation
        return Activation.IDENTITY if wanted is False else default

    def pooler(self, task: Task) -> DevicePooler:
        if task in (Task.EMBED, Task.SCORE) and self.kind is Kind.EMBEDDING:
            return DevicePooler(self.pooling_type,
                                Head.DENSE if self.dense is not None else Head.NONE)
        if task is Task.TOKEN_EMBED:
            return DevicePooler(PoolingType.ALL, Head.NONE)
        if task.per_token:
            return DevicePooler(self.token_pooling, Head.MODEL, self.pooler_config.step_tag_id)
        return DevicePooler(self.pooling_type, Head.MODEL)

    # --- device work -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """One short and one longest input through every pooler the model serves, so first
        requests do not pay for lazy initialization."""
        ids = [[0] * 8, [0] * self.max_input_tokens]
        batch = PackedBatch.build(ids, None, self.device, self.module.position_offset)
        hidden = self.forward(batch)
        for task in self.tasks:
            self.pool(hidden, batch, self.pooler(task), [0, 1])

    def prepare(self, seqs: list[Sequence]) -> PackedBatch:
        """A batch's device tensors (built while the previous batch runs)."""
        types = None
        if any(s.token_type_ids is not None for s in seqs):
            types = [s.token_type_ids or [0] * s.num_tokens for s in seqs]
        return PackedBatch.build([s.token_ids for s in seqs], types, self.device,
                                 self.module.position_offset)

    def compute(self, seqs: list[Sequence], batch: PackedBatch) -> list[torch.Tensor]:
        """One forward pass, then each pooler the sequences need (one device-to-host copy
        each); outputs in `seqs` order."""
        hidden = self.forward(batch)
        groups: dict[DevicePooler, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(seq.request.plan.pooler, []).append(i)
        outputs: list = [None] * len(seqs)
        for pooler, members in groups.items():
            for i, out in zip(members, self.pool(hidden, batch, pooler, members)):
                outputs[i] = out
        return outputs

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.module(batch)  # [num_tokens, hidden]

    @torch.inference_mode()
    def pool(self, hidden: torch.Tensor, batch: PackedBatch, pooler: DevicePooler,
             seqs: list[int]) -> list[torch.Tensor]:
        """The pooler's output for the batch's sequences `seqs`, on the host in float32: a row
        [D] per sequence, or rows [n, D] for per-token pooling."""
        if pooler.pooling.per_token:
            rows, counts = token_rows(pooler.pooling, hidden, batch, pooler.step_tag_id)
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            parts = [rows[starts[i]:starts[i + 1]] for i in seqs]
            rows, sizes = torch.cat(parts), [p.shape[0] for p in parts]
        elif self.fused and pooler.pooling in _KERNEL_POOLING:
            rows = kernels().pool(hidden, batch.cu_seqlens, pooler.pooling)[seqs]  # float32
            sizes = None
        else:
            rows = SEQUENCE_POOLERS[pooler.pooling](hidden, batch)[seqs]  # [len(seqs), hidden]
            sizes = None
        if pooler.head is Head.DENSE:
            rows = self.dense(rows)
        elif pooler.head is Head.MODEL:
            rows = self.module.head(rows.to(self.dtype))
        rows = rows.float().cpu()
        return list(rows.split(sizes)) if sizes is not None else list(rows)


@dataclass(eq=False)
class DualEncoderModel(ServedModel):
    """CLIP / SigLIP: inputs are texts or images, each through its own tower."""

    modalities = ("text", "image")

    @property
    def image_tokens(self) -> int:
        return self.module.image_tokens

    @property
    def kind(self) -> Kind:
        return Kind.DUAL_ENCODER

    @property
    def tasks(self) -> tuple[Task, ...]:
        return (Task.EMBED, Task.SCORE)

    @property
    def embed_dimensions(self) -> int:
        return self.module.dimensions

    @property
    def hidden_size(self) -> int:
        return self.module.dimensions

    @property
    def pooling_type(self) -> PoolingType:
        return PoolingType.CLS  # the towers pool themselves (CLIP: end-of-text and class token)

    def pooler(self, task: Task) -> DevicePooler:
        return DevicePooler(PoolingType.CLS, Head.MODEL)

    def prepare(self, seqs: list[Sequence]):
        """(padded text ids [texts, width], their mask, stacked pixels [images, 3, H, W])."""
        texts = [s.token_ids for s in seqs if s.pixels is None]
        ids = mask = pixels = None
        if texts:
            width = self.module.text_positions if self.module.pad_to_max else max(map(len, texts))
            ids = torch.full((len(texts), width), self.module.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(texts), width), dtype=torch.long)
            for row, t in enumerate(texts):
                ids[row, :len(t)] = torch.tensor(t)
                mask[row, :len(t)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
        images = [s.pixels for s in seqs if s.pixels is not None]
        if images:
            pixels = torch.stack(images).to(self.device, self.dtype)
        return ids, mask, pixels

    def compute(self, seqs: list[Sequence], prepared) -> list[torch.Tensor]:
        ids, mask, pixels = prepared
        texts = iter(self.module.text_features(ids, mask).float().cpu() if ids is not None else ())
        images = iter(self.module.image_features(pixels).float().cpu()
                      if pixels is not None else ())
        return [next(images) if s.pixels is not None else next(texts) for s in seqs]

    def preprocess(self, images: list) -> list[torch.Tensor]:
        return self.module.preprocess(images)

    def warm_up(self) -> None:
        from PIL import Image
        ids = torch.zeros((1, 8), dtype=torch.long, device=self.device)
        self.module.text_features(ids, torch.ones_like(ids))
        (pixels,) = self.preprocess([Image.new("RGB", (32, 32))])
        self.module.image_features(pixels[None].to(self.device, self.dtype))


def _load_dual(spec: ModelSpec, files: ModelFiles, device: torch.device, dtype: torch.dtype,
               allow_pickle: bool, is_default: bool,
               pooler_config: PoolerConfig) -> DualEncoderModel:
    module = dual.load(files, allow_pickle, dtype, device)
    vocab_size = module.model.config.text_config.vocab_size
    return DualEncoderModel(name=spec.name, files=files, module=module, dense=None,
                            tokenizer=_tokenizer(files, vocab_size), device=device, dtype=dtype,
                            max_input_tokens=_input_limit(files, module.text_positions),
                            vocab_size=vocab_size, is_default=is_default,
                            pooler_config=pooler_config, implementation="transformers")


def _tokenizer(files: ModelFiles, vocab_size: int) -> TextTokenizer:
    return TextTokenizer(load_hf_tokenizer(files.path, files.lowercase), vocab_size,
                         files.prompts, files.default_prompt_name)


def _input_limit(files: ModelFiles, positions: int) -> int:
    """The model's position table, capped by its configured maximum (max_seq_length)."""
    return min(positions, int(files.max_input_tokens or positions))


def _load_dense(specs: tuple[DenseSpec, ...], hidden_size: int,
                allow_pickle: bool) -> DenseHead | None:
    if not specs:
        return None
    layers = []
    expected = hidden_size
    for spec in specs:
        if spec.in_features != expected:
            raise ModelLoadError(f"{spec.path}: Dense in_features {spec.in_features} does not "
                                 f"match the {expected} features before it")
        linear = torch.nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        state = {k.removeprefix("linear."): v
                 for k, v in load_state_dict(spec.path, allow_pickle).items()}
        try:
            linear.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{spec.path}: Dense weights do not fit: {exc}") from None
        layers.append((linear, spec.activation))
        expected = spec.out_features
    return DenseHead(layers)


def _build_module(files: ModelFiles, allow_pickle: bool):
    """(module on the CPU with its weights, implementation name)."""
    entry = ARCHITECTURES.get(files.architecture)
    if entry is None:
        return hf_fallback.load(files, allow_pickle), "transformers"
    module_file, class_name = entry
    try:
        module = build_packed(getattr(module_file, class_name), files.hf_config, files.path,
                              allow_pickle)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{files.path}/config.json does not describe a usable "
                             f"{files.architecture}: {exc}") from exc
    return module, "poolsvc"


def build_packed(cls, hf_config: dict, path: Path, allow_pickle: bool) -> torch.nn.Module:
    """One of our model classes with the checkpoint's weights, on the CPU. Built on the meta
    device: no random init, and every parameter must then come from the checkpoint."""
    with torch.device("meta"):
        module = cls.from_hf_config(hf_config)
    module = module.to_empty(device="cpu")
    fill_weights(module, load_state_dict(path, allow_pickle), path)
    return module


def load_served_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                      allow_pickle: bool, is_default: bool, pooler_config: PoolerConfig,
                      quantize: str = "none", use_kernels: bool = True) -> ServedModel:
    path, aliases = resolve(spec.source, allow_pickle)
    files = read_model_files(path, spec.source, aliases)
    if files.architecture in dual.ARCHITECTURES:
        if quantize != "none":
            raise ModelLoadError(f"{spec.name}: --quantize does not apply to CLIP / SigLIP")
        return _load_dual(spec, files, device, dtype, allow_pickle, is_default, pooler_config)
    module, implementation = _build_module(files, allow_pickle)
    module = module.to(device=device, dtype=dtype).eval()
    if quantize == "int8":
        if device.type != "cpu":
            raise ModelLoadError("--quantize int8 is a CPU option; on GPUs use --dtype float16 "
                                 "or bfloat16")
        quantize_int8(module)
        implementation += "+int8"
    elif use_kernels and device.type == "cpu" and implementation == "poolsvc" \
            and cpu.supports(dtype):
        log.info("%s: %d matrix products on the oneDNN CPU path", spec.name, cpu.optimize(module))
    dense = _load_dense(files.dense, module.hidden_size, allow_pickle)
    if dense is not None:
        dense = dense.to(device=device, dtype=dtype).eval()

    vocab_size = int(files.hf_config["vocab_size"])
    model = ServedModel(name=spec.name, files=files, module=module, dense=dense,
                        tokenizer=_tokenizer(files, vocab_size), device=device, dtype=dtype,
                        max_input_tokens=_input_limit(files, module.max_positions),
                        vocab_size=vocab_size,
                        is_default=is_default, pooler_config=pooler_config,
                        implementation=implementation)
    if use_kernels and device.type == "cuda" and fused.available():
        fused.enable(module)
        model.fused = True
        model.implementation += "+kernels"
    if model.pooler_config.pooling_type is PoolingType.STEP and model.kind is Kind.EMBEDDING:
        raise ModelLoadError(f"{model.name}: STEP pooling needs a reward or classification head")
    log.info("loaded %s from %s: %s (%s, %s), %s, %d dims, max %d tokens, %s pooling, %s on %s",
             model.name, path, files.architecture, model.kind.value, implementation,
             "/".join(t.value for t in model.tasks), model.embed_dimensions,
             model.max_input_tokens, model.pooling_type.value, str(dtype).removeprefix("torch."),
             device)
    return model
