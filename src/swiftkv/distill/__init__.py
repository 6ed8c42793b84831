"""Knowledge-preserving distillation of SwiftKV models from their own base weights (`swiftkv distill`)."""

from swiftkv.distill.config import DistillConfig, load_config
from swiftkv.distill.recipe import DistillRecipe, distill, evaluate

__all__ = ["DistillConfig", "DistillRecipe", "distill", "evaluate", "load_config"]
