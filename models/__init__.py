"""Plain-PyTorch models: dense Llama-style and DeepSeek-style MoE transformers, with shape and FLOP arithmetic.

Import from the submodules (models.config, models.transformer); this package imports nothing eagerly so that
`models.config` stays cheap for the planner and the CLI.
"""
