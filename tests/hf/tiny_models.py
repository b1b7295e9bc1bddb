"""Tiny random Hugging Face models of every architecture we import, built locally with transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  rope_theta=500000.0),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=320,
                  max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
                      max_position_embeddings=256),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=48, num_local_experts=4,
                    num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=320, max_position_embeddings=256),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                        first_k_dense_replace=1, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        vocab_size=320, max_position_embeddings=256, routed_scaling_factor=2.5,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def build_hf_model(kind: str, seed: int = 0) -> Any:
    """A random transformers model of this architecture, fp32, in eval mode; weights drawn so every tensor,
    including norms and the DeepSeek routing bias, differs from its default."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SPECS[kind])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight") or "layernorm" in name:
                tensor.copy_(1 + 0.1 * torch.randn_like(tensor))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.05 * torch.randn_like(tensor))
            elif tensor.is_floating_point() and tensor.dim() >= 2:
                tensor.copy_(0.05 * torch.randn_like(tensor))
    return model.eval()


def save_hf_model(kind: str, folder: Path, seed: int = 0, max_shard_size: str = "40KB") -> Any:
    """Save a tiny model, sharded into several files (so imports cross file boundaries); returns the model."""
    model = build_hf_model(kind, seed)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def quantize_fp8_blocks(folder: Path, out: Path, reference: Path, block: tuple[int, int] = (16, 16)) -> None:
    """Copy a checkpoint folder to `out` with every 2-D projection inside the layers stored as float8_e4m3fn plus a
    float32 `weight_scale_inv` per block (DeepSeek-V3's format, `quantization_config.weight_block_size`), and to
    `reference` with those weights dequantized (the values an importer must arrive at), in plain float32."""
    import json
    import math
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, reference)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(folder / file))
        stored: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if ".layers." not in name or tensor.dim() != 2 or "_proj" not in name:
                stored[name] = tensor
                continue
            rows, cols = tensor.shape
            grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
            padded[:rows, :cols] = tensor
            blocks = padded.view(grid[0], block[0], grid[1], block[1])
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # e4m3's largest finite value
            quantized = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            values = (quantized.float() * scale[:, None, :, None]).view_as(padded)[:rows, :cols]
            stored[name] = quantized.view_as(padded)[:rows, :cols].contiguous()
            stored[name + "_scale_inv"] = scale.contiguous()
            dequantized[name] = values.clone()
        save_file(stored, str(out / file), metadata={"format": "pt"})
        save_file({**tensors, **{k: v for k, v in dequantized.items() if k in tensors}}, str(reference / file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name in stored})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (folder / extra).is_file():
            shutil.copy2(folder / extra, out / extra)


def write_tokenizer(folder: Path, texts: list[str]) -> None:
    """A small byte-level BPE tokenizer.json (tokenizers only) with <|endoftext|> as end of text, and the
    tokenizer_config.json that names it."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
