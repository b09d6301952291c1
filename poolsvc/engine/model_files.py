"""A model directory's config files and what they say about serving it: Hugging Face's
config.json and tokenizer files, and the Sentence-Transformers ones (modules.json, the Pooling,
Dense and Normalize modules, sentence_bert_config.json, config_sentence_transformers.json)."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.params import Activation, LateInteraction, PoolingType, Splade

# Sentence-Transformers pooling mode names (`pooling_mode`) and their legacy boolean keys.
_ST_POOLING_MODES = {
    "cls": PoolingType.CLS,
    "mean": PoolingType.MEAN,
    "max": PoolingType.MAX,
    "lasttoken": PoolingType.LAST,
    "weightedmean": PoolingType.WEIGHTED_MEAN,
    "mean_sqrt_len_tokens": PoolingType.MEAN_SQRT_LEN,
}
_ST_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
}
_ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize", "MLMTransformer", "SpladePooling",
               "MultiVectorMask")
# config_sentence_transformers.json model types of multi-vector (late-interaction) models: the
# Sentence-Transformers MultiVectorEncoder, and PyLate's ColBERT (its v3 layout).
_MULTI_VECTOR_TYPES = ("MultiVectorEncoder", "ColBERT")
# torch activation classes named in Sentence-Transformers configs.
_TORCH_ACTIVATIONS = {
    "Identity": Activation.IDENTITY,
    "Sigmoid": Activation.SIGMOID,
    "Tanh": Activation.TANH,
    "Softmax": Activation.SOFTMAX,
}


@dataclass(frozen=True)
class DenseSpec:
    """A Sentence-Transformers Dense module: Linear then an activation, after pooling."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: Activation


@dataclass(frozen=True)
class ModelFiles:
    """A model directory and what its config files say about serving it."""

    path: Path
    source: str
    aliases: tuple[str, ...]
    hf_config: dict
    architecture: str
    # Sentence-Transformers pooling and modules; None / empty where the directory has none.
    pooling_type: PoolingType | None
    normalize: bool
    dense: tuple[DenseSpec, ...]
    # Sentence-Transformers' max_seq_length, else the tokenizer's model_max_length, if any; the
    # model's position table caps it further.
    max_input_tokens: int | None
    lowercase: bool
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    matryoshka_dimensions: tuple[int, ...] = ()
    # A CrossEncoder's configured activation (config.json "sentence_transformers.activation_fn").
    score_activation: Activation | None = None
    # A SparseEncoder's SpladePooling module (pooling_type is then SPLADE).
    splade: Splade | None = None
    # A multi-vector (ColBERT) model's query and document encoding; None for other models.
    late_interaction: LateInteraction | None = None


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def read_model_files(path: Path, source: str, aliases: tuple[str, ...]) -> ModelFiles:
    hf_config = _read_json(path / "config.json")
    if not isinstance(hf_config, dict):
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    archs = hf_config.get("architectures") or []
    from poolsvc.engine.models import MODEL_TYPES
    architecture = archs[0] if archs else MODEL_TYPES.get(hf_config.get("model_type", ""), "")

    bert_cfg = _read_json(path / "sentence_bert_config.json") or {}
    st_cfg = _read_json(path / "config_sentence_transformers.json") or {}
    # Sentence-Transformers v5+ saves a CrossEncoder as a Transformer-only modules.json
    cross_encoder = st_cfg.get("model_type") == "CrossEncoder" or \
        architecture.endswith("ForSequenceClassification")
    pooling, normalize, dense = None, True, ()  # no Sentence-Transformers files: the defaults
    splade = late = None
    modules = _read_json(path / "modules.json")
    multi_vector = st_cfg.get("model_type") in _MULTI_VECTOR_TYPES
    if modules is not None:
        pooling, normalize, dense, splade = _read_st_modules(path, modules, cross_encoder,
                                                             multi_vector)
    if multi_vector:
        late = _read_late_interaction(path, st_cfg, bert_cfg, modules or [])
        normalize = normalize or st_cfg.get("model_type") == "ColBERT"  # PyLate: always
        if not dense:
            raise ModelLoadError(f"{path}: a multi-vector model needs its Dense projection")
    prompts = st_cfg.get("prompts") or {}
    default_prompt = st_cfg.get("default_prompt_name") or None
    if default_prompt is not None and default_prompt not in prompts:
        raise ModelLoadError(f"{path}: default_prompt_name {default_prompt!r} is not a prompt")
    matryoshka = hf_config.get("matryoshka_dimensions") or st_cfg.get("matryoshka_dimensions") or ()
    return ModelFiles(
        path=path, source=source, aliases=aliases, hf_config=hf_config, architecture=architecture,
        pooling_type=pooling, normalize=normalize, dense=dense,
        max_input_tokens=bert_cfg.get("max_seq_length") or _tokenizer_max_length(path),
        lowercase=bool(bert_cfg.get("do_lower_case", False)), prompts=dict(prompts),
        default_prompt_name=default_prompt,
        matryoshka_dimensions=tuple(sorted(int(d) for d in matryoshka)),
        score_activation=_cross_encoder_activation(path, hf_config, st_cfg), splade=splade,
        late_interaction=late)


def _torch_activation(path: Path, name: str) -> Activation:
    try:
        return _TORCH_ACTIVATIONS[name.rsplit(".", 1)[-1]]
    except KeyError:
        raise ModelLoadError(f"{path}: activation {name!r} is not supported; supported: "
                             f"{', '.join(_TORCH_ACTIVATIONS)}") from None


def _cross_encoder_activation(path: Path, hf_config: dict, st_cfg: dict) -> Activation | None:
    """A CrossEncoder's activation_fn: in config_sentence_transformers.json (v5+), or in
    config.json (earlier versions)."""
    name = (st_cfg.get("activation_fn") if st_cfg.get("model_type") == "CrossEncoder" else None) \
        or (hf_config.get("sentence_transformers") or {}).get("activation_fn") \
        or hf_config.get("sbert_ce_default_activation_function")
    return _torch_activation(path, name) if name else None


def _tokenizer_max_length(path: Path) -> int | None:
    value = (_read_json(path / "tokenizer_config.json") or {}).get("model_max_length")
    # transformers writes a huge sentinel (1e30) when a tokenizer has no limit
    return value if isinstance(value, int) and value < 1_000_000 else None


def _read_st_modules(path: Path, modules: list, cross_encoder: bool, multi_vector: bool = False
                     ) -> tuple[PoolingType | None, bool, tuple[DenseSpec, ...], Splade | None]:
    pooling, normalize, dense, splade = None, False, [], None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        directory = path / module.get("path", "")
        if kind not in _ST_MODULES:
            raise ModelLoadError(
                f"{path}: Sentence-Transformers module {module.get('type')!r} is not supported "
                f"(supported: {', '.join(_ST_MODULES)})")
        if kind in ("Transformer", "MLMTransformer") and module.get("path", "") not in ("", "."):
            raise ModelLoadError(f"{path}: the Transformer module must be the directory itself")
        if kind == "Pooling":
            pooling = _read_st_pooling(directory)
        elif kind == "SpladePooling":
            pooling, splade = PoolingType.SPLADE, _read_st_splade(directory)
        elif kind == "Dense":
            if (pooling is None and not multi_vector) or normalize:
                raise ModelLoadError(f"{path}: a Dense module must come after Pooling and before "
                                     "Normalize")
            dense.append(_read_st_dense(directory, multi_vector))
        normalize = normalize or kind == "Normalize"
    if multi_vector and pooling is not None:
        raise ModelLoadError(f"{path}: a multi-vector model has no Pooling module")
    if pooling is None and not cross_encoder and not multi_vector:  # their heads read the tokens
        raise ModelLoadError(f"{path}: modules.json has no Pooling module")
    return pooling, normalize, tuple(dense), splade


def _read_st_splade(directory: Path) -> Splade:
    config = _read_json(directory / "config.json") or {}
    splade = Splade(config.get("pooling_strategy", "max"),
                    config.get("activation_function", "relu"))
    if splade.strategy not in ("max", "sum") or splade.activation not in ("relu", "log1p_relu"):
        raise ModelLoadError(f"{directory}: SpladePooling {splade.strategy!r} with "
                             f"{splade.activation!r} is not supported (max or sum; relu or "
                             "log1p_relu)")
    return splade


def _read_st_dense(directory: Path, per_token: bool = False) -> DenseSpec:
    """A Dense module on the sentence embedding (on every token's, for multi-vector models)."""
    config = _read_json(directory / "config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{directory} has no config.json for its Dense module")
    # PyLate's Dense saves no input name and reads the token embeddings
    rows = "token_embeddings" if per_token else "sentence_embedding"
    if config.get("use_residual") or config.get("module_input_name", rows) != rows or \
            config.get("module_output_name", rows) != rows:
        raise ModelLoadError(f"{directory}: only plain Dense modules (no residual, on the "
                             f"{rows.replace('_', ' ')}) are supported")
    try:
        return DenseSpec(path=directory, in_features=int(config["in_features"]),
                         out_features=int(config["out_features"]),
                         bias=bool(config.get("bias", True)),
                         activation=_torch_activation(directory, config.get(
                             "activation_function", "torch.nn.modules.activation.Tanh")))
    except KeyError as exc:
        raise ModelLoadError(f"{directory}/config.json lacks {exc}") from None


def _read_st_pooling(directory: Path) -> PoolingType:
    config = _read_json(directory / "config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{directory} has no config.json for its Pooling module")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _ST_LEGACY_KEYS.items() if config.get(key)]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in _ST_POOLING_MODES:
        raise ModelLoadError(
            f"{directory}: pooling {modes} is not supported; exactly one of "
            f"{', '.join(_ST_POOLING_MODES)} is")
    if config.get("include_prompt", True) is False:
        raise ModelLoadError(f"{directory}: include_prompt=false is not supported yet")
    return _ST_POOLING_MODES[modes[0]]


def _read_late_interaction(path: Path, st_cfg: dict, bert_cfg: dict,
                           modules: list) -> LateInteraction:
    """A MultiVectorEncoder's (or PyLate v3 ColBERT's) markers, query expansion, lengths and
    skip-list, with the defaults each library applies."""
    if st_cfg.get("model_type") == "ColBERT":  # PyLate <= 3: flat keys, its defaults
        expand = st_cfg.get("do_query_expansion")
        query_length = int(st_cfg.get("query_length") or 32)
        skiplist = st_cfg.get("skiplist_words")
        return LateInteraction(
            query_marker=_pylate_marker(st_cfg.get("query_prefix"), "[Q] "),
            document_marker=_pylate_marker(st_cfg.get("document_prefix"), "[D] "),
            query_length=query_length if expand is not False else None,
            attend_expansion=bool(st_cfg.get("attend_to_expansion_tokens")),
            query_max=query_length, document_length=int(st_cfg.get("document_length") or 180),
            skiplist=tuple(skiplist if skiplist is not None else string.punctuation),
            mean=st_cfg.get("similarity_fn_name") == "meanmaxsim")
    prompts = st_cfg.get("prompts") or {}
    document = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), "")
    expansion = bert_cfg.get("query_expansion")
    masks = [m for m in modules if m.get("type", "").endswith("MultiVectorMask")]
    mask = (_read_json(path / masks[0].get("path", "") / "config.json") or {}) if masks else {}
    if mask.get("keep_only_token_ids"):
        raise ModelLoadError(f"{path}: MultiVectorMask keep_only_token_ids is not supported")
    if expansion is not None and not masks:
        raise ModelLoadError(f"{path}: query expansion without a MultiVectorMask module (which "
                             "scores the expansion tokens) is not supported")
    tasks = mask.get("skiplist_tasks") or ["document"]
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if expansion is not None and expansion.get("strategy") not in ("fixed", "min"):
        raise ModelLoadError(f"{path}: query_expansion strategy {expansion.get('strategy')!r} "
                             "is not supported (fixed or min)")
    similarity = st_cfg.get("similarity_fn_name") or "maxsim"
    if similarity not in ("maxsim", "meanmaxsim"):
        raise ModelLoadError(f"{path}: similarity_fn_name {similarity!r} is not a late-"
                             "interaction similarity (maxsim, meanmaxsim)")
    return LateInteraction(
        query_marker=prompts.get("query") or "", document_marker=document or "",
        query_length=int(expansion["length"]) if expansion else None,
        expansion=expansion["strategy"] if expansion else "fixed",
        expansion_token=(expansion or {}).get("token"),
        attend_expansion=bool((expansion or {}).get("attend")),
        query_max=bert_cfg.get("query_length"), document_length=bert_cfg.get("document_length"),
        skiplist=tuple(mask.get("skiplist_words") or ()), skip_queries="query" in tasks,
        mean=similarity == "meanmaxsim")


def _pylate_marker(value: str | None, default: str) -> str:
    return default if value is None else value
