"""Per-request LoRA adapters (peft's layout) on a packed model, as a transform of the built body.

`read_adapter` reads one adapter directory (adapter_config.json, adapter_model.safetensors) and
refuses the peft options it cannot serve. `attach_adapters` wraps each targeted nn.Linear of the
body in a `LoraLinear` holding every adapter's A and B for that layer, and makes the body's
forward hand each batch's adapter rows (`PackedBatch.adapter_rows`) to those layers. A layer then
adds, per adapter in the batch, x[rows] Aᵀ (scale B)ᵀ to the base layer's output at those rows:
requests for different adapters share one device batch, and no weights are merged.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.config import LoraSpec, default_name
from poolsvc.engine.description import AdapterInfo
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.packing import AdapterRows, PackedBatch

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# adapter_config.json options that change what an adapter computes, with the value that asks
# for nothing; any other value is refused at load (plain LoRA is what is served).
PLAIN_LORA = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
              "modules_to_save": None, "rank_pattern": None, "alpha_pattern": None,
              "target_parameters": None, "layer_replication": None,
              "trainable_token_indices": None, "alora_invocation_tokens": None,
              "use_qalora": False, "use_bdlora": None}
# Top-level modules of task heads: they run on pooled rows after the forward pass, where a
# row's adapter is not known, so adapters may not change them.
HEAD_MODULES = ("classifier", "pre_classifier", "score", "pooler", "cls", "head", "lm_head")
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter as read from its directory: per module (peft's name, the base model's HF
    module path), its A [rank, in_features] and B [out_features, rank]."""

    name: str
    path: Path
    rank: int
    scale: float            # lora_alpha / rank (use_rslora: lora_alpha / sqrt(rank))
    base_model: str         # base_model_name_or_path; "" when the config names none
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def info(self) -> AdapterInfo:
        kinds = sorted({module.rsplit(".", 1)[-1] for module in self.weights})
        return AdapterInfo(self.name, str(self.path), self.rank, tuple(kinds))


def read_adapter(spec: LoraSpec) -> LoraAdapter:
    """The adapter `spec` names, or ModelLoadError saying what does not fit."""
    path = Path(spec.path).expanduser()
    where = f"adapter {spec.name!r} ({path})"
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(f"{where}: no {CONFIG_FILE}; --lora takes a directory saved by "
                             "peft's save_pretrained")
    if not (path / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{where}: no {WEIGHTS_FILE} (safetensors only: resave the "
                             "adapter with safe_serialization=True)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {CONFIG_FILE} is not JSON: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise ModelLoadError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA "
                             "adapters are served")
    for option, plain in PLAIN_LORA.items():
        value = config.get(option, plain)
        if value != plain and value not in (None, [], {}):
            raise ModelLoadError(f"{where}: {CONFIG_FILE} sets {option}={value!r}, which is not "
                                 f"supported (only plain LoRA is served; {option} must be "
                                 f"{plain!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ModelLoadError(f"{where}: {CONFIG_FILE} needs a rank r >= 1 and a lora_alpha")
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    from safetensors.torch import load_file
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path / WEIGHTS_FILE)).items():
        match = _KEY.match(key)
        if match is None:
            raise ModelLoadError(f"{where}: {WEIGHTS_FILE} holds {key}, which is not a LoRA "
                                 "weight of a linear layer (lora_A / lora_B)")
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not parts:
        raise ModelLoadError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise ModelLoadError(f"{where}: {module} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ModelLoadError(f"{where}: the rank does not fit: {module} has lora_A "
                                 f"{tuple(a.shape)} and lora_B {tuple(b.shape)}, and "
                                 f"{CONFIG_FILE} says r={rank}")
        weights[module] = (a, b)
    return LoraAdapter(spec.name, path, rank, scale, str(config.get("base_model_name_or_path")
                                                        or ""), weights)


def check_base(adapter: LoraAdapter, model: str, source: str, names: tuple[str, ...],
               path: Path) -> None:
    """ModelLoadError unless the adapter's base model is the served one: its
    base_model_name_or_path names the served source, an alias or the same directory, or a model
    of the same name (a hub id against a local copy of it, or the name it is served as). Shapes
    are checked when attached."""
    base = adapter.base_model
    if not base or base in (source, *names):
        return
    local = Path(base).expanduser()
    if local.is_dir() and local.resolve() == path.resolve():
        return
    if default_name(base) in (default_name(source), model):
        return
    raise ModelLoadError(f"adapter {adapter.name!r} ({adapter.path}) was made for base model "
                         f"{base!r} ({CONFIG_FILE} base_model_name_or_path), but model "
                         f"{model!r} serves {source!r}")


class BatchAdapters:
    """The adapter rows of the batch the body is running (empty between batches): set by the
    body's forward (`attach_adapters`), read by each of its LoraLinear layers."""

    def __init__(self):
        self.rows: AdapterRows = ()


class LoraLinear(nn.Module):
    """A linear layer and, per adapter slot, the low-rank update of its output: for the rows of
    the batch that run with adapter s, base(x) + x Aₛᵀ (scale Bₛ)ᵀ. `base` is any layer from
    [rows, in] to [rows, out] (nn.Linear, or what the oneDNN transform makes of it)."""

    def __init__(self, base: nn.Module, batch_rows: BatchAdapters):
        super().__init__()
        self.base = base
        self.batch_rows = batch_rows
        # slot -> (Aᵀ [in, rank], (scale B)ᵀ [rank, out]); adapters that leave this layer alone
        # have no entry
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in] -> [rows, out]
        out = self.base(x)
        for slot, rows in self.batch_rows.rows:
            if (pair := self.lora.get(slot)) is None:
                continue
            a_t, b_t = pair
            delta = (x[rows] @ a_t) @ b_t  # [segment rows, out]
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)
        return out

    def extra_repr(self) -> str:
        ranks = {slot: a_t.shape[1] for slot, (a_t, _) in self.lora.items()}
        return f"adapters (slot: rank)={ranks}"


def attach_adapters(body: Backend, adapters: list[LoraAdapter], device: torch.device,
                    dtype: torch.dtype) -> None:
    """Serves `adapters` on `body` (a packed model, on its device in its dtype) as slots 1, 2,
    ... in order; slot 0 is the base model. Every targeted module must be a linear layer of the
    body whose shape fits the adapter's update. Run it before the oneDNN transform: it
    then replaces the base layers inside the wrappers."""
    batch_rows = BatchAdapters()
    layers: dict[str, LoraLinear] = {}
    prefix = body.weight_prefix  # peft names a task model's body with it ("bert.", "model.")
    for slot, adapter in enumerate(adapters, start=1):
        for module, (a, b) in adapter.weights.items():
            name = module[len(prefix):] if prefix and module.startswith(prefix) else module
            if (layer := layers.get(name)) is None:
                if (linear := _linear(body, name, adapter)) is None:
                    continue
                layers[name] = layer = LoraLinear(linear, batch_rows)
                body.set_submodule(name, layer)
            base = layer.base
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise ModelLoadError(
                    f"adapter {adapter.name!r}: the base shapes do not fit: {module} is "
                    f"[{base.out_features}, {base.in_features}] in the served model, the "
                    f"adapter's update is [{b.shape[0]}, {a.shape[1]}]")
            layer.lora[slot] = (a.to(device, dtype).T.contiguous(),
                                (b * adapter.scale).to(device, dtype).T.contiguous())
    forward = body.forward

    def run(batch: PackedBatch) -> torch.Tensor:
        batch_rows.rows = batch.adapter_rows
        try:
            return forward(batch)
        finally:
            batch_rows.rows = ()

    body.forward = run
    log.info("adapters %s on %d linear layers", ", ".join(a.name for a in adapters),
             len(layers))


def _linear(body: nn.Module, name: str, adapter: LoraAdapter) -> nn.Linear | None:
    """The body's linear layer `name`; None for a head module the served model does not have
    (BertModel's pooler: nothing served reads it)."""
    head = name.split(".", 1)[0] in HEAD_MODULES
    try:
        module = body.get_submodule(name)
    except AttributeError:
        if head:
            log.info("adapter %r: %s is not in the served model; its update is not used",
                     adapter.name, name)
            return None
        raise ModelLoadError(f"adapter {adapter.name!r}: the target modules do not fit: the "
                             f"served model has no layer {name}") from None
    if head:
        raise ModelLoadError(f"adapter {adapter.name!r}: the target modules do not fit: {name} "
                             "is in the model's task head, which runs on pooled rows; adapters "
                             "may change the body's layers only (peft: exclude_modules)")
    if not isinstance(module, nn.Linear):
        raise ModelLoadError(f"adapter {adapter.name!r}: the target modules do not fit: {name} "
                             f"is a {type(module).__name__} in the served model, not a linear "
                             "layer")
    return module


def adapted(module: nn.Module) -> bool:
    """Whether `module` holds an adapted layer: fused forms that read their layers' weights
    directly would leave its adapters out, so such modules keep their plain form."""
    return any(isinstance(m, LoraLinear) for m in module.modules())
