"""CLIP and SigLIP: a text tower and an image tower embedding into one space.

Both towers run through transformers' own CLIPModel / SiglipModel (`get_text_features`,
`get_image_features`), fed by the checkpoint's image processor, so their outputs are the
reference's by construction; the engine around them (batching, limits, pooling options,
scoring) is the same as for every other model.
"""

from __future__ import annotations

import torch
from torch import nn

from poolsvc.engine.backend import Backend
from poolsvc.engine.description import Kind
from poolsvc.engine.errors import ModelLoadError
from poolsvc.engine.model_files import ModelFiles
from poolsvc.engine.packing import PackedBatch

ARCHITECTURES = {"CLIPModel": "clip", "SiglipModel": "siglip"}


class DualEncoder(Backend):
    kind = Kind.DUAL_ENCODER
    modalities = ("text", "image")

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
        self.hidden_size = getattr(model.config, "projection_dim", None) if family == "clip" \
            else text.hidden_size
        self.max_positions = self.text_positions

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Each sequence through its tower: [num_seqs, hidden_size], already pooled."""
        images = [i for i, image in enumerate(batch.is_image) if image]
        texts = [i for i, image in enumerate(batch.is_image) if not image]
        out = None
        if texts:
            ids, mask = self._padded_texts(batch, texts)
            rows = self.text_features(ids, mask)  # [texts, hidden]
            out = rows.new_empty(batch.num_seqs, rows.shape[1])
            out[texts] = rows
        if images:
            rows = self.image_features(batch.pixel_values)  # [images, hidden]
            out = rows.new_empty(batch.num_seqs, rows.shape[1]) if out is None else out
            out[images] = rows.to(out.dtype)
        return out

    def _padded_texts(self, batch: PackedBatch, texts: list[int]):
        """The texts' ids, padded as each family's processor pads them, and their mask."""
        lens = [batch.prompt_lens[i] for i in texts]
        width = self.text_positions if self.pad_to_max else max(lens)
        ids = batch.input_ids.new_full((len(texts), width), self.pad_token_id)
        mask = torch.zeros_like(ids)
        starts = batch.cu_seqlens[:-1].tolist()
        for row, (i, n) in enumerate(zip(texts, lens)):
            ids[row, :n] = batch.input_ids[starts[i]:starts[i] + n]
            mask[row, :n] = 1
        return ids, mask

    def preprocess(self, images: list) -> list[torch.Tensor]:
        """PIL images -> [3, H, W] float32 tensors, by the checkpoint's own image processor."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return list(pixels)

    @torch.no_grad()
    def logit_scale_and_bias(self) -> tuple[float, float]:
        """(scale, bias) of the model's logits: scale * cosine + bias (CLIP has no bias)."""
        scale = float(self.model.logit_scale.exp())
        bias = float(self.model.logit_bias) if self.family == "siglip" else 0.0
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
