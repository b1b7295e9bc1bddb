"""Plain-PyTorch models: dense Llama-style and DeepSeek-style MoE transformers, and their parameter and FLOP counts.

Import from the submodules (models.transformer, models.counts); this package imports nothing eagerly so that
`models.counts` stays cheap for the planner and the CLI. Nothing here knows about parallelism.
"""
