"""One file per architecture; parameter names follow Hugging Face so one loader fills them all.

CLIP and SigLIP (models/dual.py) and architectures not listed here are served through
transformers (models/hf_fallback.py)."""

from __future__ import annotations

from poolsvc.engine.models import (
    bert,
    deberta_v2,
    distilbert,
    gemma,
    llama,
    modernbert,
    mpnet,
    nomic_bert,
    qwen2,
    qwen3,
    roberta,
)

# Hugging Face `architectures[0]` -> (module, class name); the class builds from config.json.
ARCHITECTURES = {
    "BertModel": (bert, "BertModel"),
    "BertForSequenceClassification": (bert, "BertForSequenceClassification"),
    "BertForTokenClassification": (bert, "BertForTokenClassification"),
    "RobertaForTokenClassification": (roberta, "RobertaForTokenClassification"),
    "XLMRobertaForTokenClassification": (roberta, "XLMRobertaForTokenClassification"),
    "BertForMaskedLM": (bert, "BertModel"),  # a body (its MLM head is SPLADE's, see below)
    "RobertaModel": (roberta, "RobertaModel"),
    "RobertaForSequenceClassification": (roberta, "RobertaForSequenceClassification"),
    "XLMRobertaModel": (roberta, "XLMRobertaModel"),
    "XLMRobertaForSequenceClassification": (roberta, "XLMRobertaForSequenceClassification"),
    "MPNetModel": (mpnet, "MPNetModel"),
    "MPNetForMaskedLM": (mpnet, "MPNetModel"),  # all-mpnet-base-v2's config names this
    "MPNetForSequenceClassification": (mpnet, "MPNetForSequenceClassification"),
    "MPNetForTokenClassification": (mpnet, "MPNetForTokenClassification"),
    "DistilBertModel": (distilbert, "DistilBertModel"),
    "DistilBertForMaskedLM": (distilbert, "DistilBertModel"),  # a body (SPLADE: hf_fallback)
    "DistilBertForSequenceClassification": (distilbert, "DistilBertForSequenceClassification"),
    "DistilBertForTokenClassification": (distilbert, "DistilBertForTokenClassification"),
    "ModernBertModel": (modernbert, "ModernBertModel"),
    "ModernBertForMaskedLM": (modernbert, "ModernBertModel"),  # a body (SPLADE: hf_fallback)
    "ModernBertForSequenceClassification": (modernbert, "ModernBertForSequenceClassification"),
    "ModernBertForTokenClassification": (modernbert, "ModernBertForTokenClassification"),
    "DebertaV2Model": (deberta_v2, "DebertaV2Model"),
    "DebertaV2ForMaskedLM": (deberta_v2, "DebertaV2Model"),  # a body
    "DebertaV2ForSequenceClassification": (deberta_v2, "DebertaV2ForSequenceClassification"),
    "DebertaV2ForTokenClassification": (deberta_v2, "DebertaV2ForTokenClassification"),
    "NomicBertModel": (nomic_bert, "NomicBertModel"),
    "NomicBertForMaskedLM": (nomic_bert, "NomicBertModel"),  # a body (SPLADE: hf_fallback)
    "NomicBertForSequenceClassification": (nomic_bert, "NomicBertForSequenceClassification"),
    "NomicBertForTokenClassification": (nomic_bert, "NomicBertForTokenClassification"),
    "LlamaModel": (llama, "LlamaModel"),
    "LlamaForCausalLM": (llama, "LlamaModel"),
    "LlamaForSequenceClassification": (llama, "LlamaForSequenceClassification"),
    "LlamaForTokenClassification": (llama, "LlamaForTokenClassification"),
    "MistralModel": (llama, "MistralModel"),
    "MistralForCausalLM": (llama, "MistralModel"),
    "MistralForSequenceClassification": (llama, "MistralForSequenceClassification"),
    "MistralForTokenClassification": (llama, "MistralForTokenClassification"),
    "Qwen2Model": (qwen2, "Qwen2Model"),
    "Qwen2ForCausalLM": (qwen2, "Qwen2Model"),
    "Qwen2ForSequenceClassification": (qwen2, "Qwen2ForSequenceClassification"),
    "Qwen2ForTokenClassification": (qwen2, "Qwen2ForTokenClassification"),
    "Qwen2ForRewardModel": (qwen2, "Qwen2ForRewardModel"),
    "Qwen2ForProcessRewardModel": (qwen2, "Qwen2ForProcessRewardModel"),
    "Qwen3Model": (qwen3, "Qwen3Model"),
    "Qwen3ForCausalLM": (qwen3, "Qwen3Model"),
    "Qwen3ForSequenceClassification": (qwen3, "Qwen3ForSequenceClassification"),
    "Qwen3ForTokenClassification": (qwen3, "Qwen3ForTokenClassification"),
    "GemmaModel": (gemma, "GemmaModel"),
    "GemmaForCausalLM": (gemma, "GemmaModel"),
    "GemmaForSequenceClassification": (gemma, "GemmaForSequenceClassification"),
    "GemmaForTokenClassification": (gemma, "GemmaForTokenClassification"),
    "Gemma2Model": (gemma, "Gemma2Model"),
    "Gemma2ForCausalLM": (gemma, "Gemma2Model"),
    "Gemma2ForSequenceClassification": (gemma, "Gemma2ForSequenceClassification"),
    "Gemma2ForTokenClassification": (gemma, "Gemma2ForTokenClassification"),
    "Gemma3TextModel": (gemma, "Gemma3TextModel"),  # EmbeddingGemma too (bidirectional)
    "Gemma3ForCausalLM": (gemma, "Gemma3TextModel"),
    "Gemma3TextForSequenceClassification": (gemma, "Gemma3TextForSequenceClassification"),
}
# Masked LMs served as SPLADE sparse encoders (with SpladePooling or pooling_type SPLADE); without
# that they are bodies.
SPARSE_ARCHITECTURES = {
    "BertForMaskedLM": (bert, "BertForMaskedLM"),
}
# `model_type` -> architecture, for configs without `architectures`.
MODEL_TYPES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "mpnet": "MPNetModel",
    "distilbert": "DistilBertModel",
    "modernbert": "ModernBertModel",
    "deberta-v2": "DebertaV2Model",
    "nomic_bert": "NomicBertModel",
    "llama": "LlamaModel",
    "mistral": "MistralModel",
    "qwen2": "Qwen2Model",
    "qwen3": "Qwen3Model",
    "gemma": "GemmaModel",
    "gemma2": "Gemma2Model",
    "gemma3_text": "Gemma3TextModel",
}
