"""Plain-PyTorch models: dense Llama-style and DeepSeek-style MoE transformers, with shape and FLOP arithmetic."""

from models.config import ConfigError, ModelConfig, flops_per_token, num_params
from models.transformer import Transformer, build_model, materialize

__all__ = ["ConfigError", "ModelConfig", "Transformer", "build_model", "flops_per_token", "materialize", "num_params"]
