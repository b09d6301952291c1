"""What a CPU user would run instead of poolsvc, set up the way they would set it up.

- sentence-transformers `encode` (float32, batch_size=32, its own length sorting).
- ONNX Runtime, the way fastembed, Infinity and TEI's CPU backend run it: the model exported
  with `torch.onnx.export`, tokenized by `tokenizers`, sorted by length, padded batches of 32,
  mean pooling and normalization in numpy. float32 with the graph optimizations (ORT's own
  ORT_ENABLE_ALL, and onnxruntime.transformers' BERT fusions, as optimum's O2 exports have), and
  int8 from `quantize_dynamic` with per-channel weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

BATCH = 32


class STEncoder:
    def __init__(self, model_path: str, threads: int, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer
        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_path, device=device)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=BATCH, normalize_embeddings=True)

    def close(self) -> None:
        pass


def export_onnx(model_path: str, directory: Path) -> Path:
    """The transformer body as ONNX (opset 17, the TorchScript exporter: what
    `optimum-cli export onnx` and fastembed's published models use), dynamic batch and length."""
    from transformers import AutoModel

    body = AutoModel.from_pretrained(model_path).eval()

    class Body(torch.nn.Module):  # keyword arguments: transformers 5's forward takes no others
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.body(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones(2, 16, dtype=torch.long)
    out = directory / "model.onnx"
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Body(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out),
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"}
                                        for n in [*names, "last_hidden_state"]},
                          opset_version=17, dynamo=False)
    return out


def fuse_bert(onnx_path: Path, hidden_size: int, num_heads: int) -> Path:
    """onnxruntime.transformers' BERT fusions (Attention, SkipLayerNormalization, BiasGelu)."""
    from onnxruntime.transformers import optimizer
    model = optimizer.optimize_model(str(onnx_path), model_type="bert", num_heads=num_heads,
                                     hidden_size=hidden_size, opt_level=1)
    out = onnx_path.with_name("model-fused.onnx")
    model.save_model_to_file(str(out))
    return out


def quantize_int8(onnx_path: Path) -> Path:
    """Dynamic quantization, int8 weights per output channel (activations per tensor, at run
    time): `onnxruntime.quantization.quantize_dynamic(per_channel=True)`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = onnx_path.with_name("model-int8.onnx")
    quantize_dynamic(str(onnx_path), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


class OrtEncoder:
    def __init__(self, onnx_path: Path, model_path: str, threads: int, max_tokens: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_tokens)

    def encode(self, texts: list[str]) -> np.ndarray:
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.empty((len(texts), 0), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            width = max(len(ids[i]) for i in rows)
            input_ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(input_ids)
            for r, i in enumerate(rows):
                input_ids[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = 1
            feed = {"input_ids": input_ids, "attention_mask": mask,
                    "token_type_ids": np.zeros_like(input_ids)}
            hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            if out.shape[1] == 0:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
        return out

    def close(self) -> None:
        pass
