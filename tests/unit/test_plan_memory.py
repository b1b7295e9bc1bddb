"""The memory model against hand counts, Korthikanti et al. 2022, and tensors measured in one process."""

from __future__ import annotations

import pytest
import torch

from configs.schema import ModelConfig
from models.kernels import kernels_for
from models.transformer import build_model
from parallel.materialize import materialize
from parallel.engine import token_cross_entropy
from parallel.plan.config import load_plan_config
from parallel.plan.estimate import Estimator, RankPlan, Workload
from parallel.layout import Layout
from parallel.plan.measure import LiveTensorMeter, SavedTensorMeter, state_bytes
from parallel.plan.memory import TokenShape, layer_activation_bytes
from parallel.plan.pipeline import in_flight
from parallel.plan.software import MEGATRON_2021, SUPERTRAIN, SUPERTRAIN_CPU
from parallel.plan.topology import build_cluster
from parallel.recompute import apply_recompute


def setup(name: str, *overrides: str):
    cfg = load_plan_config([f"model={name}", "cluster=h100", *overrides])
    return cfg.model, build_cluster(cfg.cluster)


def test_korthikanti_gpt_layer_is_reproduced_for_megatron_2021() -> None:
    # GPT-3 style layer, fp16, no parallelism: Korthikanti et al. 2022 eq. 1 gives s*b*h*(34 + 5*a*s/h) bytes.
    h, a, s = 2304, 24, 2048
    cfg = ModelConfig(n_layers=1, d_model=h, n_heads=a, ffn_hidden=4 * h, activation="gelu", vocab_size=51200,
                      max_seq_len=s)
    ours = layer_activation_bytes(cfg, 0, TokenShape(s, 1), "none", MEGATRON_2021)
    assert ours == pytest.approx(s * h * (34 + 5 * a * s / h), rel=0.05)


def test_recompute_keeps_less_and_sequence_parallel_divides() -> None:
    cfg, _ = setup("llama3_8b")
    shape = TokenShape(8192, 1, tp=8)
    none, selective, full = (layer_activation_bytes(cfg, 0, shape, r) for r in ("none", "selective", "full"))
    assert none > selective > full == 8192 * cfg.d_model * 2
    sp = TokenShape(8192, 1, tp=8, sequence_parallel=True)
    assert layer_activation_bytes(cfg, 0, sp, "full") == pytest.approx(full / 8)
    assert layer_activation_bytes(cfg, 0, sp, "none") < none


def test_pipeline_schedules_keep_the_documented_number_of_micro_batches() -> None:
    assert in_flight("1f1b", 8, 1, 64, 0) == 8 and in_flight("1f1b", 8, 1, 64, 7) == 1
    assert in_flight("gpipe", 8, 1, 64, 3) == 64
    # Korthikanti s4.2.3: interleaving multiplies 1F1B's first-stage memory by 1 + (p-1)/(p v).
    assert in_flight("interleaved_1f1b", 8, 4, 64, 0) == pytest.approx(8 * (1 + 7 / 32))
    assert in_flight("dualpipev", 8, 2, 64, 0) == 9


def test_states_of_one_unsharded_rank_are_counted_exactly() -> None:
    cfg, cluster = setup("tiny")
    est = Estimator(Workload(cfg, 64, 2, "fp32"), cluster)
    layout = Layout(micro_batch=2, dp_engine="ddp", zero_stage=0)
    predicted = est.rank_states(layout, est.rank_plans(layout)[0])[0]
    model = materialize(build_model(cfg, "meta", kernels=kernels_for("cpu")), cfg, torch.device("cpu"), 0)
    optimizer = torch.optim.AdamW(model.parameters())
    token_cross_entropy(model(torch.randint(0, cfg.vocab_size, (2, 64))), torch.zeros(2, 64, dtype=torch.long)).backward()
    optimizer.step()
    measured = state_bytes(list(model.parameters()), optimizer)
    assert (predicted.parameters, predicted.gradients, predicted.optimizer) == (
        measured["parameters"], measured["gradients"], measured["optimizer"])


@pytest.mark.parametrize("name", ["tiny", "tiny_moe"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("seq", [128, 512])  # 512: fp32 attention runs the blocked kernel, which keeps probabilities
def test_predicted_activations_are_within_10_percent_of_measured(name: str, recompute: str, seq: int) -> None:
    cfg, cluster = setup(name)
    batch = 2
    torch.manual_seed(0)
    model = materialize(apply_recompute(build_model(cfg, "meta", kernels=kernels_for("cpu")), recompute), cfg, torch.device("cpu"), 0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    params = list(model.parameters())
    with SavedTensorMeter(params) as saved, LiveTensorMeter() as live:
        loss = token_cross_entropy(model(tokens), tokens)
    # Saved-tensor hooks see what autograd saves; checkpointed regions keep theirs out of sight, so with
    # recompute the tensors still alive after the forward are the measure.
    measured = saved.bytes if recompute == "none" else live.live_bytes(exclude=params)
    est = Estimator(Workload(cfg, seq, batch, "fp32"), cluster, SUPERTRAIN_CPU)
    layout = Layout(micro_batch=batch, recompute=recompute, dp_engine="ddp", zero_stage=0)
    predicted = est.rank_memory(layout, 0, est.rank_plans(layout)[0]).activations
    assert predicted == pytest.approx(measured, rel=0.10)
    del loss


def test_fsdp_pads_each_parameter_shard_and_shards_the_optimizer() -> None:
    cfg, cluster = setup("tiny", "cluster.num_devices=3")
    est = Estimator(Workload(cfg, 64, 6, "bf16"), cluster, SUPERTRAIN)
    plan = RankPlan(cfg.n_layers, 0, True, True)
    ddp_layout = Layout(dp_replicate=3, dp_shard=1, dp_engine="ddp", zero_stage=0)
    ddp = est.rank_states(ddp_layout, plan)[0]
    fsdp = [est.rank_states(Layout(dp_shard=3), plan, i)[0] for i in range(3)]
    steps = 4 * est.rank_tensors(plan, ddp_layout).count  # AdamW's 4-byte step per tensor, on every rank
    # Held moments add up exactly to the replicated ones; padded parameter storage is at least a third.
    assert sum(f.optimizer for f in fsdp) - 3 * steps == ddp.optimizer - steps
    assert all(f.parameters >= ddp.parameters / 3 for f in fsdp)
    assert sum(f.parameters for f in fsdp) > ddp.parameters  # 3 does not divide the 512-row vocabulary
