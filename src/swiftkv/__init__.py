"""swiftkv: SwiftKV (SingleInputKV + AcrossKV) for Hugging Face causal LMs.

`import swiftkv` registers the `*_swiftkv` model types with `AutoConfig` / `AutoModelForCausalLM`.
"""

from swiftkv.config import SUPPORTED_FAMILIES
from swiftkv.modeling import MODEL_FOR_FAMILY, register_auto_classes

register_auto_classes()

__all__ = ["MODEL_FOR_FAMILY", "SUPPORTED_FAMILIES"]
__version__ = "0.1.0"
