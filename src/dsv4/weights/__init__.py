"""Model weights in the formats people have (spec 9): HF transformers' layout and DeepSeek's official one.

``names`` maps tensor names between dsv4, HF and the official layout; ``files`` reads and writes (sharded)
safetensors, never pickle; ``official`` dequantizes what it reads (FP8 128x128 blocks, packed FP4 experts) and writes
the official layout quantized; ``hf`` writes transformers' layout and loads a model from either. Every writer replaces
its directory atomically and every loader recovers one first (``dsv4.atomic``). Training checkpoints (weights with
optimizer state) are another module: ``dsv4.train.checkpoint``.
"""

from __future__ import annotations

from dsv4.weights.files import read_tensors
from dsv4.weights.hf import from_pretrained, load_state, save_pretrained
from dsv4.weights.names import official_state_of, official_to_model_state, to_official
from dsv4.weights.official import OFFICIAL_QUANTIZATION_CONFIG, official_config_dict, official_state, save_official

__all__ = ["OFFICIAL_QUANTIZATION_CONFIG", "from_pretrained", "load_state", "official_config_dict",
           "official_state", "official_state_of", "official_to_model_state", "read_tensors", "save_official",
           "save_pretrained", "to_official"]
