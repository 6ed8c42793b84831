"""SwiftKV model classes for the supported Hugging Face families."""

from swiftkv.modeling.families import MODEL_FOR_FAMILY, register_auto_classes

__all__ = ["MODEL_FOR_FAMILY", "register_auto_classes"]
