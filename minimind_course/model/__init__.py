"""The model layer: MiniMind's architecture (``minimind``), loading any checkpoint (``loading``), export for vLLM.

Importing it registers ``model_type: "minimind"`` with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads a MiniMind folder without ``trust_remote_code``.
"""

from minimind_course.model.loading import ModelLoadError, load_model
from minimind_course.model.minimind import MiniMindConfig, MiniMindForCausalLM

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "ModelLoadError", "load_model"]
