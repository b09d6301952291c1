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


# --- task checkpoints with their own tokenizers ---------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
    "Paris is the capital and largest city of France.", "A cat is a small feline.",
    "Step 1: add two and two. Step 2: the answer is four.", "Embeddings map text to vectors.",
    "東京は日本の首都です。", "مرحبا بالعالم", "café naïve façade 🚀",
] * 20


def bpe_tokenizer(directory: Path, style: str) -> int:
    """A byte-level BPE tokenizer trained on a small corpus, saved as transformers would.

    style "roberta": <s> A </s></s> B </s> (XLM-R / RoBERTa, pad id 1). style "decoder": the text
    then an end-of-text token, as Qwen3-Embedding and e5-mistral tokenizers append one.
    Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if style == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    else:
        specials = ["<|endoftext|>", "<|pad|>", "<step>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if style == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       sep_token="</s>", cls_token="<s>", pad_token="<pad>",
                                       unk_token="<unk>", mask_token="<mask>",
                                       model_input_names=["input_ids", "attention_mask"])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<|pad|>",
                                       model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(directory)
    return tok.get_vocab_size()


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Norm weights away from one and heads large enough that a wrong head is visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn_like(p) * scale)
            elif any(k in name for k in ("classifier", "score", "pooler")):
                p.mul_(20)


def xlmr_classifier(directory: Path, num_labels: int = 1, seed: int = 0,
                    activation_fn: str | None = None) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    directory.mkdir(parents=True, exist_ok=True)
    vocab = bpe_tokenizer(directory, "roberta")
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=96,
                              max_position_embeddings=130, type_vocab_size=1,
                              pad_token_id=1, num_labels=num_labels)
    if activation_fn:
        config.sentence_transformers = {"activation_fn": activation_fn}
    model = XLMRobertaForSequenceClassification(config).eval()
    _perturb(model)
    model.save_pretrained(directory)
    return directory


def bert_classifier(directory: Path, minilm_path: Path, num_labels: int, seed: int = 0,
                    **config_kw) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=128,
                        num_labels=num_labels, **config_kw)
    model = BertForSequenceClassification(config).eval()
    _perturb(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, directory / name)
    return directory


DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)


def decoder(directory: Path, family: str, task: str = "Model", seed: int = 0, **config_kw) -> Path:
    """A tiny `transformers` decoder (family "Qwen2", "Qwen3", "Mistral", "Llama"; task "Model",
    "ForCausalLM", "ForSequenceClassification" or "ForTokenClassification") with a byte-level
    BPE tokenizer."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = bpe_tokenizer(directory, "decoder")
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(vocab_size=vocab, pad_token_id=1,
                                                      **{**DECODER, **config_kw})
    model = getattr(transformers, f"{family}{task}")(config).eval()
    _perturb(model)
    model.save_pretrained(directory)
    return directory


def qwen2_reward(directory: Path, num_labels: int, architecture: str, seed: int = 0) -> Path:
    """The layout of Qwen2.5-Math-RM / -PRM (not in transformers): a Qwen2 body under "model."
    and a Linear-ReLU-Linear head on every token, named score.0 / score.2."""
    import transformers
    from safetensors.torch import save_file

    body = decoder(directory, "Qwen2", seed=seed)
    state = {f"model.{k}": v for k, v in
             transformers.Qwen2Model.from_pretrained(body).state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = DECODER["hidden_size"]
    state["score.0.weight"] = torch.randn(hidden, hidden, generator=generator) * 0.3
    state["score.0.bias"] = torch.randn(hidden, generator=generator) * 0.3
    state["score.2.weight"] = torch.randn(num_labels, hidden, generator=generator) * 0.3
    state["score.2.bias"] = torch.randn(num_labels, generator=generator) * 0.3
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config.update(architectures=[architecture], num_labels=num_labels)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def reward_reference(directory: Path, ids: list[int]) -> torch.Tensor:
    """transformers' Qwen2Model on one sequence, then the reward head: [len(ids), num_labels]."""
    import transformers
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    body = transformers.Qwen2Model.from_pretrained(directory).eval()
    with torch.no_grad():
        hidden = body(torch.tensor([ids])).last_hidden_state[0]
        x = torch.relu(hidden @ state["score.0.weight"].T + state["score.0.bias"])
        return x @ state["score.2.weight"].T + state["score.2.bias"]


def load_ours(cls, directory: Path) -> torch.nn.Module:
    """One of poolsvc's model classes loaded from `directory` exactly as the server does."""
    from poolsvc.engine.loader import build_packed
    config = json.loads((directory / "config.json").read_text())
    return build_packed(cls, config, directory, allow_pickle=False).eval()


def dual_encoder(directory: Path, family: str, seed: int = 0) -> Path:
    """A tiny CLIPModel or SiglipModel with its image processor config and a tokenizer."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = bpe_tokenizer(directory, "decoder")  # "<|endoftext|>" (id 0) ends every text
    torch.manual_seed(seed)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, pad_token_id=1, bos_token_id=0, eos_token_id=0,
                max_position_embeddings=64 if family == "siglip" else 77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    if family == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=text, vision_config=vision, projection_dim=24))
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(
            text_config=text, vision_config=vision))
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def splade(directory: Path, minilm_path: Path, layout: str = "sparse-encoder",
           strategy: str = "max", activation: str = "relu", seed: int = 0,
           family: str = "bert") -> Path:
    """A tiny random masked LM (`family` "bert" or "distilbert") with MiniLM's vocabulary: saved
    by sentence-transformers as a SparseEncoder (MLMTransformer + SpladePooling) with
    `layout="sparse-encoder"`, or as the plain transformers checkpoint with `layout="mlm"`."""
    import transformers

    torch.manual_seed(seed)
    if family == "distilbert":
        model = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
            vocab_size=30522, dim=48, n_layers=2, n_heads=4, hidden_dim=96,
            max_position_embeddings=128)).eval()
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=128)).eval()
    _perturb(model)
    mlm = directory / "mlm" if layout == "sparse-encoder" else directory
    mlm.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(mlm)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, mlm / name)
    if layout == "mlm":
        return directory
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    SparseEncoder(modules=[MLMTransformer(str(mlm)), SpladePooling(strategy, activation)],
                  device="cpu").save(str(directory / "st"))
    return directory / "st"


NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def token_classifier(directory: Path, minilm_path: Path, family: str = "bert",
                     seed: int = 0) -> Path:
    """A tiny random `*ForTokenClassification` (`family` "bert", with MiniLM's WordPiece
    vocabulary, or "xlm-roberta", with a byte-level BPE one) with NER labels."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, id2label=NER_LABELS)
    if family == "xlm-roberta":
        vocab = bpe_tokenizer(directory, "roberta")
        model = transformers.XLMRobertaForTokenClassification(transformers.XLMRobertaConfig(
            vocab_size=vocab, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
            **common))
    else:
        model = transformers.BertForTokenClassification(transformers.BertConfig(
            vocab_size=30522, max_position_embeddings=128, **common))
        for name in TOKENIZER_FILES:
            shutil.copy(minilm_path / name, directory / name)
    _perturb(model.eval())
    model.save_pretrained(directory)
    return directory


# --- encoder families beyond BERT: MPNet, DistilBERT, ModernBERT --------------------------------

# Odd head counts and small widths; ModernBERT's local layers see 4 tokens either side
# (local_attention 8), so most test inputs are longer than its sliding window.
FAMILY_CONFIGS = {
    "mpnet": dict(hidden_size=45, num_hidden_layers=2, num_attention_heads=3,
                  intermediate_size=64, max_position_embeddings=202, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2),
    "distilbert": dict(dim=36, n_layers=2, n_heads=3, hidden_dim=64,
                       max_position_embeddings=128),
    "modernbert": dict(hidden_size=60, num_hidden_layers=4, num_attention_heads=5,
                       intermediate_size=40, max_position_embeddings=128, local_attention=8,
                       global_attn_every_n_layers=3, global_rope_theta=160000.0,
                       local_rope_theta=10000.0, pad_token_id=0, cls_token_id=101,
                       sep_token_id=102, bos_token_id=101, eos_token_id=102),
}
FAMILY_CLASSES = {"mpnet": "MPNet", "distilbert": "DistilBert", "modernbert": "ModernBert"}


def wordpiece_tokenizer(directory: Path, minilm_path: Path) -> int:
    """MiniLM's WordPiece tokenizer ([CLS] 101, [SEP] 102, [PAD] 0) without token type ids, as
    DistilBERT's and ModernBERT's tokenizers have none. Returns the vocabulary size."""
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path / name, directory / name)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return 30522


def encoder_family(directory: Path, minilm_path: Path, family: str, task: str = "Model",
                   seed: int = 0, **config_kw) -> Path:
    """A tiny random transformers `family` model ("mpnet", "distilbert", "modernbert"; task
    "Model", "ForSequenceClassification" or "ForTokenClassification"), saved with a tokenizer:
    MPNet a byte-level BPE one with MPNet's special ids (<s> 0, <pad> 1, </s> 2), the others
    MiniLM's WordPiece."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    if family == "mpnet":
        vocab = bpe_tokenizer(directory, "roberta")
    else:
        vocab = wordpiece_tokenizer(directory, minilm_path)
    prefix = FAMILY_CLASSES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=vocab, **{**FAMILY_CONFIGS[family], **config_kw})
    model = getattr(transformers, f"{prefix}{task}")(config).eval()
    with torch.no_grad():  # trained norms are not identity, trained biases not zero
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    _perturb(model, scale=0.0)
    model.save_pretrained(directory)
    return directory


def colbert(directory: Path, minilm_path: Path, layout: str = "multi-vector-encoder",
            query_length: int = 16, document_length: int = 40, attend: bool = False,
            similarity: str | None = None, seed: int = 0, family: str = "bert") -> Path:
    """A tiny random ColBERT: a 2-layer BERT (or `family` "distilbert" or "electra") with
    MiniLM's vocabulary plus the [Q] / [D] marker tokens, a bias-free Dense projection to 16
    dimensions, punctuation skipped in documents and queries expanded with [MASK] to
    `query_length`. Saved by sentence-transformers as a MultiVectorEncoder
    (`layout="multi-vector-encoder"`), or in PyLate's (v3) layout (`layout="pylate"`:
    Transformer + Dense and the flat ColBERT keys)."""
    import string

    from safetensors.torch import save_file
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    if family in ("distilbert", "electra"):
        import transformers
        torch.manual_seed(seed)
        body = directory / "body"
        if family == "distilbert":
            model = transformers.DistilBertModel(transformers.DistilBertConfig(
                vocab_size=30522, dim=48, n_layers=2, n_heads=4, hidden_dim=96,
                max_position_embeddings=128)).eval()
        else:
            model = transformers.ElectraModel(transformers.ElectraConfig(
                vocab_size=30522, embedding_size=48, hidden_size=48, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=96, max_position_embeddings=128)).eval()
        _perturb(model)
        model.save_pretrained(body)
        for name in TOKENIZER_FILES:
            shutil.copy(minilm_path / name, body / name)
    else:
        body = tiny_bert(directory / "body", minilm_path, seed=seed)
    transformer = Transformer(str(body), document_length=document_length, query_expansion={
        "strategy": "fixed", "length": query_length, "attend": attend})
    transformer.tokenizer.add_tokens(["[Q] ", "[D] "])
    transformer.auto_model.resize_token_embeddings(len(transformer.tokenizer))
    torch.manual_seed(seed + 1)
    dense = Dense(48, 16, bias=False, activation_function=torch.nn.Identity(),
                  module_input_name="token_embeddings")
    model = MultiVectorEncoder(
        modules=[transformer, dense, MultiVectorMask(skiplist_words=list(string.punctuation)),
                 Normalize(module_input_name="token_embeddings")],
        prompts={"query": "[Q] ", "document": "[D] "}, similarity_fn_name=similarity,
        device="cpu")
    out = directory / "colbert"
    if layout == "multi-vector-encoder":
        model.save(str(out))
        return out
    # PyLate v3: the body at the root, its Dense, and its settings in one config file
    transformer.save(str(out))
    (out / "1_Dense").mkdir()
    save_file({"linear.weight": dense.linear.weight.detach().contiguous()},
              str(out / "1_Dense" / "model.safetensors"))
    (out / "1_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 48, "out_features": 16, "bias": False,
         "activation_function": "torch.nn.modules.linear.Identity"}))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"}]))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": document_length - 1, "do_lower_case": False}))
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "ColBERT", "query_prefix": "[Q] ", "document_prefix": "[D] ",
         "query_length": query_length, "document_length": document_length,
         "attend_to_expansion_tokens": attend, "skiplist_words": list(string.punctuation),
         "do_query_expansion": True, "prompts": {}, "default_prompt_name": None,
         "similarity_fn_name": similarity}))
    return out


def bge_m3(directory: Path, seed: int = 0, colbert_dim: int = 24) -> Path:
    """A tiny random BGE-M3 in FlagEmbedding's layout: an XLM-R body (byte-level BPE vocabulary)
    saved by transformers, its Sentence-Transformers files (CLS pooling, Normalize), and the
    heads as plain tensor state dicts: `colbert_linear.pt` (hidden -> `colbert_dim`) and
    `sparse_linear.pt` (hidden -> 1)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab = bpe_tokenizer(directory, "roberta")
    torch.manual_seed(seed)
    model = XLMRobertaModel(XLMRobertaConfig(
        vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1),
        add_pooling_layer=False).eval()
    _perturb(model)
    model.save_pretrained(directory)
    add_st_config(directory, "cls", normalize=True)
    colbert_linear = torch.nn.Linear(48, colbert_dim)
    sparse_linear = torch.nn.Linear(48, 1)
    with torch.no_grad():
        sparse_linear.bias.fill_(0.05)  # about half the tokens weigh above 0
    torch.save(colbert_linear.state_dict(), directory / "colbert_linear.pt")
    torch.save(sparse_linear.state_dict(), directory / "sparse_linear.pt")
    return directory
