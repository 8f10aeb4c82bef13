"""mops_fast: Mixture of Prompts (MoPs) for frozen, compressed LLaMA-family models."""
from mops_fast.config import MoPsConfig
from mops_fast.hf.adapter import (add_adapter, adapter_names, detach_adapter, load_adapter, remove_adapter,
                                  save_adapter, using_adapters)
from mops_fast.hf.attach import attach, detach, init_prompts_from_kv
from mops_fast.hf.loading import load_model
from mops_fast.hf.lora import LoraSettings, attach_lora

__version__ = "0.1.0"
__all__ = ["MoPsConfig", "attach", "detach", "save_adapter", "load_adapter", "load_model",
           "init_prompts_from_kv", "add_adapter", "remove_adapter", "adapter_names",
           "using_adapters", "detach_adapter", "LoraSettings", "attach_lora", "__version__"]
