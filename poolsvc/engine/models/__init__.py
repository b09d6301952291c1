"""One file per architecture; parameter names follow Hugging Face so one loader fills them all."""

from __future__ import annotations

from poolsvc.engine.models import bert

# Hugging Face `architectures[0]` -> (module, class name); the module builds it from config.json.
ARCHITECTURES = {
    "BertModel": (bert, "BertModel"),
}
# `model_type` -> architecture, for configs without `architectures`.
MODEL_TYPES = {
    "bert": "BertModel",
}
