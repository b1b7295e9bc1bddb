"""Hugging Face checkpoints in one process: our model computes what transformers' computes after an import, an
export loads into transformers with the same logits, import -> export -> import is bit-exact, FP8 block-scaled
weights are dequantized, generation matches transformers' greedy search, and bad folders stop in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.errors import CheckpointError, ConfigError
from conftest import REPO, clean_env
from models.transformer import build_model
from parallel.materialize import materialize
from tiny_models import SPECS, build_hf_model, quantize_fp8_blocks, write_tokenizer
from train.config import load_config
from train.generate import generate
from train.hf.config import model_config_from_hf, read_hf_config
from train.hf.export import export_hf
from train.hf.load import check_hf_config, load_hf_weights

KINDS = sorted(SPECS)
ATOL = 1e-5


def _tokens(vocab: int, seq: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


def _imported(folder: Path, seed: int = 7):
    cfg = model_config_from_hf(read_hf_config(folder))
    model = materialize(build_model(cfg), cfg, torch.device("cpu"), seed)  # a seed unlike the checkpoint's
    load_hf_weights([model], cfg, folder)
    return model.eval(), cfg


@pytest.mark.parametrize("kind", KINDS)
def test_imported_logits_equal_transformers(kind: str, hf_folders) -> None:
    model, cfg = _imported(hf_folders[kind])
    reference = build_hf_model(kind)  # the same seed as the saved folder
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_transformers_with_the_same_logits(kind: str, hf_folders, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model, cfg = _imported(hf_folders[kind])
    out = export_hf([model], cfg, tmp_path / "out", "float32", hf_folders[kind], shard_bytes=64 * 1024)
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == json.loads((hf_folders[kind] / "config.json").read_text())["architectures"][0]
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens), rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_import_export_import_is_bit_exact(kind: str, hf_folders, tmp_path) -> None:
    first, cfg = _imported(hf_folders[kind])
    out = export_hf([first], cfg, tmp_path / "out", "float32", shard_bytes=64 * 1024)
    second, _ = _imported(out, seed=11)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers_generate(kind: str, hf_folders) -> None:
    model, cfg = _imported(hf_folders[kind])
    reference = build_hf_model(kind)
    prompt = [5, 17, 42, 99, 3]
    eos = reference.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    ours = generate(model, prompt, max_new_tokens=12, eos_id=eos)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    assert ours == theirs.tolist()


def test_fp8_block_scaled_weights_are_dequantized_on_load(hf_folders, tmp_path) -> None:
    """DeepSeek-V3's FP8 format with 16 x 16 blocks on tensors whose sides are not multiples of 16 (partial blocks)."""
    from transformers import AutoModelForCausalLM

    fp8, dequantized = tmp_path / "fp8", tmp_path / "dequantized"
    quantize_fp8_blocks(hf_folders["deepseek_v3"], fp8, dequantized)
    model, cfg = _imported(fp8)
    reference = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=0, atol=ATOL)


# ---- bad folders --------------------------------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _rewrite_tensors(folder: Path, holding: str, change) -> None:
    """Apply `change` to the tensors of the file that holds tensor `holding`, and re-index."""
    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = index["weight_map"][holding]
    tensors = load_file(str(folder / file))
    change(tensors)
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file}
    index["weight_map"].update({name: file for name in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_missing_tensor_is_an_error_naming_it(hf_folders, tmp_path) -> None:
    folder = _copy(hf_folders["llama"], tmp_path)
    name = "model.layers.1.mlp.gate_proj.weight"
    _rewrite_tensors(folder, name, lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match=f"has no tensor {name}"):
        _imported(folder)


def test_an_unused_tensor_is_an_error_naming_it(hf_folders, tmp_path) -> None:
    folder = _copy(hf_folders["llama"], tmp_path)
    _rewrite_tensors(folder, "model.norm.weight",
                     lambda tensors: tensors.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"holds model\.layers\.0\.self_attn\.q_proj\.bias that this model "
                                              r"would not use"):
        _imported(folder)


def test_a_tensor_of_the_wrong_shape_is_an_error(hf_folders, tmp_path) -> None:
    folder = _copy(hf_folders["llama"], tmp_path)
    name = "model.layers.1.mlp.gate_proj.weight"
    _rewrite_tensors(folder, name, lambda tensors: tensors.update({name: tensors[name][:-1]}))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight has shape \(95, 64\) where this model's "):
        _imported(folder)


@pytest.mark.parametrize("field, value, theirs", [
    ("vocab_size", 512, 320), ("n_routed_experts", 8, 4), ("top_k", 1, 2), ("moe_ffn_hidden", 64, 32),
])
def test_a_config_mismatch_names_the_field_and_both_values(field, value, theirs, hf_folders) -> None:
    """The run's model against config.json, before any weight is read."""
    folder = hf_folders["qwen3_moe"]
    ours = dataclasses.replace(model_config_from_hf(read_hf_config(folder)), **{field: value})
    with pytest.raises(CheckpointError) as error:
        check_hf_config(folder, ours)
    message = str(error.value)
    assert f"config.json gives model.{field}={theirs} and this run has model.{field}={value}" in message
    assert "\n" not in message


def test_the_cli_refuses_a_mismatched_model_in_one_line(hf_folders, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "train", "model=tiny", f"checkpoint.init_from_hf={hf_folders['llama']}",
         "data.tokenizer=byte", "logging.mode=disabled", f"run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "config.json gives model.d_model=64 and this run has model.d_model=256" in last


def test_from_hf_without_a_folder_is_refused() -> None:
    with pytest.raises(ConfigError, match="model=from_hf reads the model's shapes from checkpoint.init_from_hf"):
        load_config(["model=from_hf"])


def test_not_a_hugging_face_folder(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="has no config.json"):
        _imported(tmp_path)


# ---- tokenizer, CLI -----------------------------------------------------------------------------------------


def test_the_folders_tokenizer_is_used_unless_told_otherwise(hf_folders, tmp_path) -> None:
    from train.data import load_tokenizer

    folder = _copy(hf_folders["llama"], tmp_path)
    write_tokenizer(folder, ["def f(x):\n    return x + 1\n"] * 50)
    cfg = load_config(["model=from_hf", f"checkpoint.init_from_hf={folder}"])
    assert cfg.data.tokenizer == str(folder)
    assert load_config(["model=from_hf", f"checkpoint.init_from_hf={folder}", "data.tokenizer=byte"]
                       ).data.tokenizer == "byte"
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.eos_id == tokenizer._tok.token_to_id("<|endoftext|>")
    assert tokenizer.decode(tokenizer.encode("return x + 1").tolist()) == "return x + 1"


def test_generate_and_export_commands(hf_folders, tmp_path) -> None:
    """A short training run from an HF folder, then the two commands a user runs on its step folder."""
    from transformers import AutoModelForCausalLM

    folder = _copy(hf_folders["qwen3"], tmp_path)
    write_tokenizer(folder, ["def f(x):\n    return x + 1\n"] * 50)
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "train", "model=from_hf", f"checkpoint.init_from_hf={folder}", "train.steps=2",
         "train.seq_len=32", "train.global_batch=2", "train.micro_batch=1", "data.max_bytes=100000",
         "logging.mode=disabled", "train.mixed_precision=fp32", f"run.dir={run}", "checkpoint.every=2"],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert train.returncode == 0, train.stderr
    step = run / "checkpoints" / "step_2"
    export = subprocess.run([sys.executable, "-m", "train.export_hf", str(step), "--dtype", "float32"],
                            capture_output=True, text=True, timeout=300, env=clean_env(), cwd=REPO)
    assert export.returncode == 0, export.stderr
    out = run / "hf-step_2"
    assert (out / "tokenizer.json").is_file()  # copied from the folder the run started from
    generated = {}
    for source in (step, out):
        result = subprocess.run([sys.executable, "-m", "train.generate", str(source), "--prompt", "def f(x):",
                                 "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300,
                                env=clean_env(), cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("def f(x):")
        generated[source] = result.stdout
    assert generated[step] == generated[out]  # the trained weights, whichever way they are read
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from train.model_source import load_model

    ours = load_model(step, torch.device("cpu")).model
    tokens = _tokens(ours.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, ours(tokens), rtol=0, atol=ATOL)
