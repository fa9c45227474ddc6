"""Multi-modal architectures: their modalities and processor adapter, imported on first use.

A multi-modal family is a model file under pagedllm/models (registered in models/registry.py)
plus a processor adapter under pagedllm/multimodal/processors (registered here).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.multimodal.processing import MultiModalProcessorAdapter

# architecture → (module under pagedllm.multimodal.processors, adapter class, modalities)
_PROCESSORS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ProcessorAdapter", ("image",)),
    "InternVLChatModel": ("internvl", "InternVLProcessorAdapter", ("image",)),
    "InternVLForConditionalGeneration": ("internvl", "InternVLProcessorAdapter", ("image",)),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLProcessorAdapter", ("image", "video")),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2_5_VLProcessorAdapter", ("image", "video")),
}


def is_multimodal_architecture(architecture: str) -> bool:
    return architecture in _PROCESSORS


def modalities_of(architecture: str) -> tuple[str, ...]:
    return _PROCESSORS[architecture][2] if architecture in _PROCESSORS else ()


def get_processor_adapter_class(architecture: str) -> type[MultiModalProcessorAdapter]:
    module_name, class_name, _ = _PROCESSORS[architecture]
    module = importlib.import_module(f"pagedllm.multimodal.processors.{module_name}")
    return getattr(module, class_name)
