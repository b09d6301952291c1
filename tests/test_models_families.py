"""MPNet, DistilBERT and ModernBERT on the packed code against transformers: bodies and their
sequence and token classifiers, sequence by sequence and in mixed-length packed batches, with and
without the oneDNN CPU path; their Sentence-Transformers directories against
SentenceTransformer.encode through the offline API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from tiny_models import FAMILY_CLASSES, encoder_family, load_ours, st_pipeline

from poolsvc import LLM
from poolsvc.engine import cpu, native
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.models import ARCHITECTURES
from poolsvc.engine.packing import PackedBatch
from poolsvc.engine.pooler import sequence_rows

ATOL = 1e-4
CPU = dict(device="cpu", threads=2)
# Lengths around each family's limits: MPNet's relative distances past its 128 exact/log
# buckets, ModernBERT's sliding window (4 tokens either side) and its longest input.
LENGTHS = {"mpnet": [7, 1, 200, 23, 150], "distilbert": [7, 1, 128, 23],
           "modernbert": [7, 1, 5, 128, 23, 6, 40]}
FAMILIES = list(LENGTHS)
TEXTS = ["What is the capital of France?", "x",
         "Paris is the capital and largest city of France, on the Seine.",
         "café naïve 🚀 東京は日本の首都です。 and a longer tail of words after it"]


def ours_class(family: str, task: str):
    module, name = ARCHITECTURES[f"{FAMILY_CLASSES[family]}{task}"]
    return getattr(module, name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_path):
    """family -> task -> directory, built once for the module."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, family in enumerate(FAMILIES):
        out[family] = {task: encoder_family(root / f"{family}-{task}", minilm_path, family, task,
                                            seed=seed, **extra)
                       for task, extra in [("Model", {}),
                                           ("ForSequenceClassification", {"num_labels": 3}),
                                           ("ForTokenClassification", {"num_labels": 5})]}
    out["modernbert"]["mean"] = encoder_family(
        root / "modernbert-mean", minilm_path, "modernbert", "ForSequenceClassification",
        seed=9, num_labels=2, classifier_pooling="mean")
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """The CPU path's slices and row blocks small enough that these batches take the sliced,
    several-block and padded paths."""
    monkeypatch.setattr(cpu, "SLICE_TOKENS", 40)
    monkeypatch.setattr(cpu, "ROW_BLOCK", 32)
    monkeypatch.setattr(cpu, "EXACT_ROWS", 8)


def sequences(family: str, vocab: int) -> list[list[int]]:
    """Random ids (never 0-4: MPNet's specials, whose pad id shifts positions) after a
    first special token, as a tokenizer writes them."""
    gen = torch.Generator().manual_seed(len(family))
    first = 0 if family == "mpnet" else 101
    return [[first] + torch.randint(5, vocab, (n - 1,), generator=gen).tolist()
            for n in LENGTHS[family]]


def forward_both(ours, hf, ids):
    """Our packed forward over every sequence at once, and transformers' on each alone."""
    batch = PackedBatch.build(ids, None, torch.device("cpu"), ours.position_offset)
    with torch.no_grad():
        hidden = ours(batch)  # [num_tokens, hidden]
        outputs = [hf(torch.tensor([s])) for s in ids]
    return batch, hidden, outputs


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item()


# native: MPNet's score bias keeps PyTorch's attention, ModernBERT's local layers take the
# kernel only where no sequence outgrows the window (LENGTHS has both kinds of batches)
@pytest.mark.parametrize("path", ["torch", "onednn", "native"])
@pytest.mark.parametrize("family", FAMILIES)
def test_body_matches_transformers(checkpoints, family, path, small_blocks):
    directory = checkpoints[family]["Model"]
    hf = transformers.AutoModel.from_pretrained(directory).eval()
    ours = load_ours(ours_class(family, "Model"), directory)
    if path != "torch":
        kernels = native.load() if path == "native" else None
        if path == "native" and kernels is None:
            pytest.skip("the native kernels cannot be built here (no C++ compiler)")
        assert cpu.optimize(ours, kernels) > 0
    assert ours.max_positions == max(LENGTHS[family])
    ids = sequences(family, hf.config.vocab_size)
    _, hidden, outputs = forward_both(ours, hf, ids)
    want = torch.cat([o.last_hidden_state[0] for o in outputs])
    assert max_diff(hidden, want) <= ATOL


@pytest.mark.parametrize("case", ["mpnet", "distilbert", "modernbert", "modernbert-mean"])
def test_sequence_classifier_matches_transformers(checkpoints, case):
    family = case.split("-")[0]
    directory = checkpoints[family]["mean" if case.endswith("mean") else
                                    "ForSequenceClassification"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    ours = load_ours(ours_class(family, "ForSequenceClassification"), directory)
    assert ours.num_labels == hf.config.num_labels
    ids = sequences(family, hf.config.vocab_size)
    batch, hidden, outputs = forward_both(ours, hf, ids)
    with torch.no_grad():
        logits = ours.head(sequence_rows(ours.head_pooling, hidden, batch.cu_seqlens, None))
    assert max_diff(logits, torch.stack([o.logits[0] for o in outputs])) <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_token_classifier_matches_transformers(checkpoints, family):
    directory = checkpoints[family]["ForTokenClassification"]
    hf = transformers.AutoModelForTokenClassification.from_pretrained(directory).eval()
    ours = load_ours(ours_class(family, "ForTokenClassification"), directory)
    ids = sequences(family, hf.config.vocab_size)
    _, hidden, outputs = forward_both(ours, hf, ids)
    with torch.no_grad():
        logits = ours.head(hidden)
    assert max_diff(logits, torch.cat([o.logits[0] for o in outputs])) <= ATOL


@pytest.mark.parametrize("family,pooling", [("mpnet", "mean"), ("modernbert", "mean"),
                                            ("modernbert", "cls"), ("distilbert", "mean")])
def test_sentence_transformers_directory(checkpoints, tmp_path, family, pooling):
    from sentence_transformers import SentenceTransformer
    directory = st_pipeline(tmp_path / "st", checkpoints[family]["Model"], pooling)
    want = SentenceTransformer(str(directory), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with LLM(str(directory), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = np.array([o.outputs.embedding for o in llm.embed(TEXTS)])
    assert np.abs(got - want).max() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_offline_classifiers(checkpoints, family):
    """Sequence and token classifiers through the offline API (the CPU path), against
    transformers on the same tokenizer's ids."""
    tasks = checkpoints[family]
    tok = transformers.AutoTokenizer.from_pretrained(tasks["ForSequenceClassification"])
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(
        tasks["ForSequenceClassification"]).eval()
    tagger = transformers.AutoModelForTokenClassification.from_pretrained(
        tasks["ForTokenClassification"]).eval()
    with torch.no_grad():
        encoded = [tok(t, return_tensors="pt") for t in TEXTS]
        want_probs = [torch.softmax(seq(**e).logits[0], -1).numpy() for e in encoded]
        want_tags = [torch.softmax(tagger(**e).logits[0], -1).numpy() for e in encoded]
    with LLM(str(tasks["ForSequenceClassification"]), **CPU) as llm:
        got = [o.outputs.probs for o in llm.classify(TEXTS)]
    np.testing.assert_allclose(np.array(got), np.array(want_probs), atol=ATOL)
    with LLM(str(tasks["ForTokenClassification"]), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = llm.encode(TEXTS, pooling_task="token_classify")
    for g, want in zip(got, want_tags):
        np.testing.assert_allclose(g.outputs.data.numpy(), want, atol=ATOL)


def test_masked_lms_are_bodies_and_splade_stays_on_transformers(tmp_path, minilm_path):
    directory = encoder_family(tmp_path / "mlm", minilm_path, "modernbert", "ForMaskedLM",
                               seed=11)
    hf = transformers.ModernBertModel.from_pretrained(directory).eval()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        want = [torch.nn.functional.normalize(hf(**tok(t, return_tensors="pt"))
                                              .last_hidden_state[0, 0], dim=-1).numpy()
                for t in TEXTS]
    with LLM(str(directory), **CPU) as llm:
        assert llm.engine.model("").implementation == "poolsvc"
        got = [o.outputs.embedding for o in llm.embed(TEXTS)]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL)
    with LLM(str(directory), pooler_config={"pooling_type": "SPLADE"}, **CPU) as llm:
        assert llm.engine.model("").implementation == "transformers"
        assert len(llm.embed(TEXTS[:1])[0].outputs.embedding) == hf.config.vocab_size


@pytest.mark.parametrize("family,change,message", [
    ("mpnet", {"relative_attention_num_buckets": 16}, "relative_attention_num_buckets 16"),
    ("mpnet", {"max_position_embeddings": 2}, "leaves no positions"),
    ("distilbert", {"n_heads": 5}, "dim must be a multiple of n_heads"),
    ("distilbert", {"activation": "swiglu"}, "activation 'swiglu' is not supported"),
    ("modernbert", {"hidden_activation": "geglu"}, "hidden_activation 'geglu' is not supported"),
    ("modernbert", {"classifier_pooling": "max"}, "classifier_pooling 'max' is not supported"),
    ("modernbert", {"layer_types": ["full_attention"]}, "layer_types must name 4 layers"),
    ("modernbert", {"rope_parameters": {"full_attention": {"rope_type": "yarn"}}},
     "rope_type 'yarn' is not supported"),
])
def test_unsupported_configs_are_named(checkpoints, tmp_path, family, change, message):
    """The loader refuses them with the reason, not with a shape error or at the first batch."""
    directory = shutil.copytree(checkpoints[family]["ForSequenceClassification"], tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=f"does not describe a usable.*{message}"):
        LLM(str(directory), **CPU)
