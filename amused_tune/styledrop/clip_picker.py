"""Automatic feedback for StyleDrop round 2 on any base: a CLIP model scores each candidate.

- content: the cosine similarity of the candidate's image embedding to its prompt's text embedding (does it show
  what the prompt asks?), the prompt's style words (`style_words`, a regular expression: "in [V] style") left out;
- style: the cosine similarity of the candidate's image embedding to the reference (round 1's style image; with
  several style images, to their mean embedding).

A candidate is kept when both scores are at least the `quantile` of the candidates' scores (default the median):
the ones that are good at both. The CLIP model is one the user names (a Hub id or a local folder holding a
`CLIPModel` and its tokenizer), e.g. openai/clip-vit-base-patch32.
"""

from __future__ import annotations

import re

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipPicker:
    """`picker(images, prompts, reference) -> list[bool]` for `train.styledrop.pick`, scoring with a CLIP model."""

    def __init__(self, model, tokenizer, quantile: float = 0.5, style_words: str = r"\s*in \[v\] style"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.quantile, self.style_words = quantile, style_words
        self.scores: list[tuple[float, float]] = []  # (content, style) of the last call, for reports

    @classmethod
    def load(cls, name: str, **kw) -> "ClipPicker":
        """The CLIP model `name` (Hub id or folder); ValueError with a one-line reason and the fix when it cannot
        be loaded (not downloaded and offline, no such folder, not a CLIP model)."""
        from transformers import CLIPModel, CLIPTokenizer

        try:
            return cls(CLIPModel.from_pretrained(name), CLIPTokenizer.from_pretrained(name), **kw)
        except (OSError, ValueError, KeyError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"the CLIP model {name} could not be loaded ({reason}): download it once while online "
                             f"(hf download {name}) or pass a local folder holding a CLIPModel and its "
                             "tokenizer") from None

    def _pixels(self, images) -> torch.Tensor:
        size = self.model.config.vision_config.image_size
        batch = []
        for image in images:
            x = torch.tensor(list(image.convert("RGB").resize((size, size)).getdata()), dtype=torch.float32)
            x = x.view(size, size, 3).permute(2, 0, 1) / 255.0
            batch.append((x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])
        return torch.stack(batch)

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self._pixels(images))
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out, dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        content = [re.sub(self.style_words, "", p, flags=re.IGNORECASE).strip() or p for p in prompts]
        ids = self.tokenizer(content, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out, dim=-1)

    def __call__(self, images, prompts: list[str], reference) -> list[bool]:
        if not images:
            return []
        img = self.image_embeds(images)
        content = (img * self.text_embeds(prompts)).sum(-1)
        references = reference if isinstance(reference, (list, tuple)) else [reference] * (reference is not None)
        if references:
            style = img @ torch.nn.functional.normalize(self.image_embeds(list(references)).mean(0), dim=-1)
        else:
            style = torch.ones(len(images))
        self.scores = list(zip(content.tolist(), style.tolist()))
        c_min, s_min = torch.quantile(content, self.quantile), torch.quantile(style, self.quantile)
        return [bool(c >= c_min and s >= s_min) for c, s in zip(content, style)]
