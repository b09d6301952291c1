"""Tiny random-weight checkpoints built from transformers configs, saved like the hub's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


def tiny_bert(directory: Path, minilm_path: Path, *, safetensors: bool = True, seed: int = 0,
              max_positions: int = 128) -> Path:
    """A 2-layer BERT with MiniLM's tokenizer (so its vocabulary), random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96,
                        max_position_embeddings=max_positions)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # make LayerNorm affine non-trivial, as in trained models
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if not safetensors:  # the legacy pickled layout (transformers 5 no longer writes it)
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, directory / name)
    return directory


def add_st_config(directory: Path, pooling_mode: str, normalize: bool,
                  max_seq_length: int | None = None, prompts: dict | None = None) -> Path:
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    legacy = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
              "max": "pooling_mode_max_tokens", "lasttoken": "pooling_mode_lasttoken"}
    config = {"word_embedding_dimension": 48, **{k: False for k in legacy.values()},
              legacy[pooling_mode]: True}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(config))
    if max_seq_length:
        (directory / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": max_seq_length, "do_lower_case": False}))
    if prompts:
        (directory / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": prompts, "default_prompt_name": None}))
    return directory


def st_pipeline(directory: Path, body: Path, pooling_mode: str,
                dense: tuple[tuple[int, torch.nn.Module], ...] = (), normalize: bool = True,
                seed: int = 0) -> Path:
    """A Sentence-Transformers directory saved by sentence-transformers itself: the body, one
    Pooling mode, Dense layers (out_features, activation) and optionally Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(seed)
    transformer = Transformer(str(body))
    width = transformer.get_embedding_dimension()
    modules = [transformer, Pooling(width, pooling_mode)]
    for out_features, act in dense:
        modules.append(Dense(width, out_features, activation_function=act))
        width = out_features
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(directory))
    return directory
