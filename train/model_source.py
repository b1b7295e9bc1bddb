"""A trained or published model, built whole in one process: from a Hugging Face folder or one of our step folders.

For tools that look at a model rather than train it (`python -m train.generate`): the model is small enough for one
process, or the user accepts that it must be. Training and export never build a whole model anywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from configs.errors import CheckpointError
from configs.schema import ModelConfig
from models.transformer import Transformer, build_model
from parallel.materialize import materialize
from train.config import config_of_run
from train.hf.config import model_config_from_hf, read_hf_config
from train.hf.load import load_hf_weights


@dataclass
class LoadedModel:
    model: Transformer
    cfg: ModelConfig
    tokenizer: Optional[str]  # what data.tokenizer would be for this model: a folder, a tokenizer.json or "byte"


def _load_step_folder(folder: Path, model: Transformer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    set_model_state_dict(model, state["model"])


def load_model(source: Path, device: torch.device) -> LoadedModel:
    """`source`: a Hugging Face folder (config.json) or a step folder of a run (run.dir/checkpoints/step_<N>)."""
    if (source / "config.json").is_file():
        cfg = model_config_from_hf(read_hf_config(source), name=f"hf:{source.name}")
        model = materialize(build_model(cfg), cfg, device, seed=0)
        load_hf_weights([model], cfg, source)
        tokenizer = str(source) if (source / "tokenizer.json").is_file() else "byte"
        return LoadedModel(model.eval(), cfg, tokenizer)
    if (source / ".metadata").is_file():
        config = config_of_run(source.parent.parent / "config.yaml")
        model = materialize(build_model(config.model), config.model, device, seed=0)
        _load_step_folder(source, model)
        return LoadedModel(model.eval(), config.model, config.data.tokenizer or "byte")
    raise CheckpointError(f"{source} is neither a Hugging Face model folder (config.json) nor a checkpoint step "
                          f"folder (.metadata): point at one")
