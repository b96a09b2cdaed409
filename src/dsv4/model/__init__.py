"""The DeepSeek-V4 model, one idea per file (see DESIGN.md)."""

from dsv4.model.transformer import Block, ModelOutput, MTPBlock, Transformer

__all__ = ["Block", "ModelOutput", "MTPBlock", "Transformer"]
