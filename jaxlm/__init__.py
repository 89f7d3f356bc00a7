"""jaxlm: Transformer language models in JAX/Flax."""

__version__ = "0.1.0"

from jaxlm.api import LM, load  # noqa: E402
from jaxlm.config import ModelConfig  # noqa: E402
from jaxlm.transformer import Decoder, Encoder, build_model  # noqa: E402

__all__ = ["LM", "load", "ModelConfig", "Decoder", "Encoder", "build_model", "__version__"]
