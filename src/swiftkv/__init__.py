"""swiftkv: SwiftKV (SingleInputKV + AcrossKV) for Hugging Face causal LMs.

The public API (README, "Python API"):

    model, tokenizer = swiftkv.load("default", adapter="smollm2-L15-g1")   # the one loader
    swift = swiftkv.convert(model, num_key_value_layers=15, key_value_group_size=1)
    swiftkv.calibrate(swift, tokenizer, ["chitchat"])                    # least-squares K/V init
    swiftkv.save_adapter(swift, "out/adapter"); swiftkv.apply_adapter(base, "out/adapter")
    with swiftkv.swiftkv_mode(model, False): ...                         # the base model (teacher)

`import swiftkv` also registers the `*_swiftkv` model types with `AutoConfig` / `AutoModelForCausalLM`.
"""

from swiftkv.modeling import MODEL_FOR_FAMILY, register_auto_classes

register_auto_classes()

from swiftkv.adapter import apply_adapter, bundled_adapters, save_adapter  # noqa: E402
from swiftkv.calibration import calibrate  # noqa: E402
from swiftkv.config import SUPPORTED_FAMILIES  # noqa: E402
from swiftkv.conversion import convert  # noqa: E402
from swiftkv.loading import load  # noqa: E402
from swiftkv.modes import swiftkv_mode  # noqa: E402

__all__ = [
    "MODEL_FOR_FAMILY",
    "SUPPORTED_FAMILIES",
    "apply_adapter",
    "bundled_adapters",
    "calibrate",
    "convert",
    "load",
    "save_adapter",
    "swiftkv_mode",
]
__version__ = "0.1.0"
