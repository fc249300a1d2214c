"""Decoder model families (Llama, GLM, GLM-4) behind one class chosen by ModelConfig flags."""

from llm_engine.models.decoder import CausalLM, build_model
from llm_engine.models.weights import init_random_weights, load_weights

__all__ = ["CausalLM", "build_model", "init_random_weights", "load_weights"]
