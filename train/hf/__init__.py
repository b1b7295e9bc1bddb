"""Hugging Face checkpoints: start from one (`checkpoint.init_from_hf`) and hand one back (`checkpoint.export_hf`).

    config.py   config.json <-> ModelConfig, per architecture (llama, qwen3, qwen3_moe, mixtral, deepseek_v3)
    names.py    which Hugging Face tensor (and which part of it) each of our tensors is, both ways
    files.py    safetensors: sliced reads (FP8 blocks dequantized), counted bytes, sharded writes with an index
    load.py     every rank reads only the blocks of the tensors it holds, straight into its shards
    export.py   each tensor gathered once, written by one rank of those holding it; ranks write their own files
"""
