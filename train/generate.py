"""Continue a prompt with a trained or imported model: the quickest look at whether it works.

    python -m train.generate /models/Qwen3-0.6B --prompt "def fibonacci(n):" --max-new-tokens 40
    python -m train.generate outputs/run/checkpoints/step_500 --prompt "import os" --top-p 0.9 --temperature 0.8

Greedy by default (the same tokens as transformers' `generate` without sampling); `--top-p` samples from the
smallest set of tokens whose probability reaches p. One process, the whole model on one device, and no key/value
cache: each new token runs the whole sequence again, which is slow for long continuations but keeps the model code
free of inference state.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from configs.errors import ConfigError
from launch.device import resolve_device
from models.transformer import Transformer
from train.data import load_tokenizer
from train.model_source import load_model


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, top_p: float = 0.0,
             temperature: float = 1.0, eos_id: Optional[int] = None, seed: int = 0) -> list[int]:
    """The new token ids after `prompt`: greedy when top_p is 0, else nucleus sampling at `temperature`."""
    if not prompt:
        raise ConfigError("the prompt is empty after tokenization: give --prompt some text")
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens)[0, -1].float()
        if top_p <= 0:
            token = int(logits.argmax())
        else:
            probabilities = torch.softmax(logits / temperature, dim=-1)
            ordered, order = probabilities.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < top_p  # the smallest prefix whose mass reaches top_p
            ordered = ordered * keep
            token = int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])
        new.append(token)
        if token == eos_id:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)
    return new


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a Hugging Face model folder or a run's checkpoints/step_<N>")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.0, help="0: greedy; else nucleus sampling")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="override: 'byte', a tokenizer.json or a model folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or npu")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1 or not 0 <= args.top_p <= 1 or args.temperature <= 0:
            raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1, --top-p={args.top_p} in [0, 1] "
                              f"and --temperature={args.temperature} > 0")
        device = resolve_device(args.device)
        loaded = load_model(args.source, device.torch_device(0))
        tokenizer = load_tokenizer(args.tokenizer or loaded.tokenizer)
        prompt = [int(t) for t in tokenizer.encode(args.prompt)]
        new = generate(loaded.model, prompt, args.max_new_tokens, args.top_p, args.temperature, tokenizer.eos_id,
                       args.seed)
    except ConfigError as error:  # CheckpointError and DataError included
        sys.stderr.write(f"error: {error}\n")
        return 2
    sys.stdout.write(args.prompt + tokenizer.decode(new) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
