"""Loading models, LoRA/QLoRA adapters, and exporting trained models."""

from exemplar.model.export import merge_adapter, save_model
from exemplar.model.loading import load_model
from exemplar.model.lora import check_method_supported

__all__ = ["check_method_supported", "load_model", "merge_adapter", "save_model"]
