"""CLIP and SigLIP: a text tower and an image tower embedding into one space.

Both towers run through transformers' own CLIPModel / SiglipModel (`get_text_features`,
`get_image_features`), fed by the checkpoint's image processor, so their outputs are the
reference's by construction; the engine around them (batching, limits, pooling options,
scoring) is the same as for every other model.
"""

from __future__ import annotations

import torch
from torch import nn

from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.loader import ModelFiles

ARCHITECTURES = {"CLIPModel": "clip", "SiglipModel": "siglip"}


class DualEncoder(nn.Module):
    def __init__(self, model: nn.Module, processor, family: str):
        super().__init__()
        self.model = model
        self.processor = processor
        self.family = family
        text, vision = model.config.text_config, model.config.vision_config
        self.text_positions = text.max_position_embeddings
        # SigLIP pools its text at the last position and was trained on inputs padded to the
        # full length: pad the same way, or the embedding changes.
        self.pad_to_max = family == "siglip"
        self.pad_token_id = text.pad_token_id if text.pad_token_id is not None else 0
        patches = (vision.image_size // vision.patch_size) ** 2
        self.image_tokens = patches + (1 if family == "clip" else 0)
        self.dimensions = getattr(model.config, "projection_dim", None) if family == "clip" \
            else text.hidden_size

    def preprocess(self, images: list) -> list[torch.Tensor]:
        """PIL images -> [3, H, W] float32 tensors, by the checkpoint's own image processor."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return list(pixels)

    def logit_scale_and_bias(self) -> tuple[float, float]:
        scale = float(self.model.logit_scale.exp())
        bias = float(self.model.logit_bias) if hasattr(self.model, "logit_bias") else 0.0
        return scale, bias

    @torch.inference_mode()
    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pad_to_max:  # SigLIP's text tower is used without a mask, as its processor does
            return _features(self.model.get_text_features(input_ids=ids))
        return _features(self.model.get_text_features(input_ids=ids, attention_mask=mask))

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))


def _features(out) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def load(files: ModelFiles, allow_pickle: bool, dtype: torch.dtype,
         device: torch.device) -> DualEncoder:
    import transformers

    family = ARCHITECTURES[files.architecture]
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    try:
        model, info = cls.from_pretrained(str(files.path), dtype=dtype,
                                          use_safetensors=None if allow_pickle else True,
                                          output_loading_info=True)
        processor = transformers.AutoImageProcessor.from_pretrained(str(files.path))
    except Exception as exc:
        raise ModelLoadError(f"{files.path}: cannot load {files.architecture} with its image "
                             f"processor (preprocessor_config.json): {exc}") from exc
    if missing := sorted(info.get("missing_keys") or []):
        raise ModelLoadError(f"{files.path}: weights missing from the checkpoint: "
                             f"{', '.join(missing[:5])}")
    return DualEncoder(model.to(device).eval(), processor, family)
