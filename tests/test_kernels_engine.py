"""The engine with its Triton kernels on (run by Triton's interpreter on the CPU here, compiled
on CUDA) equals the engine with them off, on packed batches of mixed lengths."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import TEXTS  # noqa: E402
from tiny_models import decoder, load_ours, tiny_bert  # noqa: E402

from poolsvc import LLM  # noqa: E402
from poolsvc.engine import fused  # noqa: E402
from poolsvc.engine.models.qwen3 import Qwen3Model  # noqa: E402
from poolsvc.engine.packing import PackedBatch  # noqa: E402

LENS = (9, 1, 23, 4)


def packed(vocab: int) -> PackedBatch:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENS]
    return PackedBatch.build(ids, None, torch.device("cpu"))


def test_bert_layers(tmp_path, minilm_path):
    from poolsvc.engine.models.bert import BertModel
    module = load_ours(BertModel, tiny_bert(tmp_path / "bert", minilm_path, seed=4))
    batch = packed(30522)
    with torch.inference_mode():
        want = module(batch)
        assert fused.enable(module) == 6  # 2 layers x (attention output, intermediate, output)
        got = module(batch)
    assert (got - want).abs().max() <= 1e-5


def test_decoder_layers_rotary_and_norms(tmp_path):
    directory = decoder(tmp_path / "qwen3", "Qwen3", head_dim=32, seed=5)
    module = load_ours(Qwen3Model, directory)
    batch = packed(module.config.vocab_size)
    with torch.inference_mode():
        want = module(batch)
        fused.enable(module)
        got = module(batch)
    assert (got - want).abs().max() <= 1e-5


def test_served_model_with_kernels_equals_without(tmp_path, minilm_path):
    """Pooling (CLS, MEAN) through the kernel, the BERT layers fused, end to end."""
    directory = tiny_bert(tmp_path / "bert", minilm_path, seed=6)
    for pooling in ("CLS", "MEAN"):
        with LLM(str(directory), device="cpu", threads=2,
                 pooler_config={"pooling_type": pooling}) as llm:
            want = np.array([o.outputs.embedding for o in
                             llm.embed(TEXTS, truncate_prompt_tokens=-1)])
            model = llm.engine.served("")
            fused.enable(model.backend)
            model.use_kernels = True
            got = np.array([o.outputs.embedding for o in
                            llm.embed(TEXTS, truncate_prompt_tokens=-1)])
        assert np.abs(got - want).max() <= 1e-5
