"""dsv4: DeepSeek-V4 in PyTorch."""

from dsv4.cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.model import Transformer

__version__ = "0.1.0"


def from_pretrained(path, **kwargs) -> Transformer:
    """Load a model from a directory in HF transformers layout or DeepSeek's official layout (safetensors only)."""
    from dsv4.weights import from_pretrained as _load

    return _load(path, **kwargs)


__all__ = ["ModelCache", "ModelConfig", "Transformer", "from_pretrained", "__version__"]
