"""A loaded model: its module on the device, tokenizer and serving settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from poolsvc.config import ModelSpec
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.loader import (
    ModelFiles,
    fill_weights,
    load_state_dict,
    read_model_files,
    resolve,
)
from poolsvc.engine.models import ARCHITECTURES
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.params import PoolingType, Task
from poolsvc.engine.pooling import SEQUENCE_POOLERS
from poolsvc.engine.tokenizer import TextTokenizer, load_hf_tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedModel:
    name: str
    files: ModelFiles
    module: torch.nn.Module
    tokenizer: TextTokenizer
    device: torch.device
    dtype: torch.dtype
    max_input_tokens: int
    vocab_size: int
    is_default: bool

    @property
    def tasks(self) -> tuple[Task, ...]:
        return (Task.EMBED,)

    @property
    def pooling_type(self) -> PoolingType:
        return self.files.pooling_type

    @property
    def hidden_size(self) -> int:
        return self.module.hidden_size

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(a for a in self.files.aliases if a != self.name)

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Pooled sequence vectors, [num_seqs, hidden] float32, on the device."""
        hidden = self.module(batch)  # [num_tokens, hidden]
        return SEQUENCE_POOLERS[self.pooling_type](hidden, batch.cu_seqlens)


def load_served_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                      allow_pickle: bool, is_default: bool) -> ServedModel:
    path, aliases = resolve(spec.source, allow_pickle)
    files = read_model_files(path, spec.source, aliases)
    entry = ARCHITECTURES.get(files.architecture)
    if entry is None:
        raise ModelLoadError(f"{path}: architecture {files.architecture or '(none)'} is not "
                             f"supported yet; supported: {', '.join(sorted(ARCHITECTURES))}")
    module_file, class_name = entry
    try:
        with torch.device("meta"):  # no random init: every parameter is filled from the checkpoint
            module = getattr(module_file, class_name).from_hf_config(files.hf_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json does not describe a usable "
                             f"{files.architecture}: {exc}") from exc
    module = module.to_empty(device="cpu")
    fill_weights(module, load_state_dict(path, allow_pickle), path)
    module = module.to(device=device, dtype=dtype).eval()

    tok = load_hf_tokenizer(path, files.lowercase)
    limits = [module.max_positions]
    if files.max_input_tokens:
        limits.append(int(files.max_input_tokens))
    vocab_size = int(files.hf_config["vocab_size"])
    tokenizer = TextTokenizer(tok, vocab_size, files.prompts, files.default_prompt_name)
    model = ServedModel(name=spec.name, files=files, module=module, tokenizer=tokenizer,
                        device=device, dtype=dtype, max_input_tokens=min(limits),
                        vocab_size=vocab_size, is_default=is_default)
    log.info("loaded %s from %s: %s, %d dims, max %d tokens, %s pooling, %s on %s", model.name,
             path, files.architecture, model.hidden_size, model.max_input_tokens,
             model.pooling_type.value, str(dtype).removeprefix("torch."), device)
    return model
