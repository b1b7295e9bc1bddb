"""Our model against Hugging Face transformers' LlamaForCausalLM on the trunk benchmark's shape (d_model 512, 4
layers, 4 heads of 128, SwiGLU 1536, vocabulary 512, batch 8 x 512 positions, fp32 CPU): forward + backward of one
batch, the median of paired rounds (ours, then theirs, alternating, so that the shared host's drift hits both).

Our model runs the CPU kernel backend (models/kernels/cpu); transformers runs its default (SDPA) attention. Both
compute the same function (tests/hf checks logits to 1e-5), so only the time differs.

`python -m bench versus_hf`; about a minute on the 2-core development machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.trunk import BATCH, D_MODEL, SEQ_LEN

ROUNDS = 9


def _models() -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.kernels import kernels_for
    from models.transformer import build_model
    from parallel.materialize import materialize
    from train.hf.config import model_config_from_hf

    hf_config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=512, max_position_embeddings=SEQ_LEN,
                            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    theirs = LlamaForCausalLM(hf_config).float().train()
    cfg = model_config_from_hf(hf_config.to_dict())
    ours = materialize(build_model(cfg, kernels=kernels_for("cpu")), cfg, torch.device("cpu"), seed=0).train()
    return ours, theirs


def _step(forward: Any, tokens: torch.Tensor) -> float:
    started = time.perf_counter()
    logits = forward(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return time.perf_counter() - started


def run() -> dict[str, Any]:
    from models.kernels import kernels_for

    kernels_for("cpu").prepare()
    ours, theirs = _models()
    tokens = torch.randint(0, 512, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    steps = {"ours": lambda: _step(ours, tokens), "transformers": lambda: _step(lambda t: theirs(t).logits, tokens)}
    for step in steps.values():  # warm-up: kernels built, allocator primed
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            ours.zero_grad(set_to_none=True)
            theirs.zero_grad(set_to_none=True)
            times[name].append(step())
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "ours_s": median["ours"],
        "transformers_s": median["transformers"],
        "speedup": median["transformers"] / median["ours"],
        "threads": torch.get_num_threads(),
    }
