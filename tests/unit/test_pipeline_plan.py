"""Pipeline stage cutting and schedule checks, before any process group: layers per stage, stage placement, and
one-line errors for schedules that cannot run."""

import pytest

from configs.errors import ConfigError
from models.transformer import build_model
from parallel.dims import ParallelDims
from parallel.pipeline import build_stage, plan_pipeline
from parallel.rules import even_split, layer_split_problem, schedule_problem
from train.config import load_config

CFG = load_config(["model.n_layers=8"]).model


def test_even_split_gives_spare_layers_to_the_middle_stages_first():
    assert even_split(10, 4) == [2, 3, 3, 2]
    assert even_split(6, 5) == [1, 1, 2, 1, 1]  # the centre stage before its neighbours
    assert even_split(7, 5) == [1, 2, 2, 1, 1]
    assert plan_pipeline(CFG, 2, 1, "1f1b", []).layers == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_user_moves_layers_between_stages():
    assert plan_pipeline(CFG, 4, 1, "1f1b", [1, 3, 3, 1]).layers == ((0,), (1, 2, 3), (4, 5, 6), (7,))
    # the ends may carry only the embedding or the head
    assert [len(s) for s in plan_pipeline(CFG, 4, 1, "1f1b", [0, 4, 4, 0]).layers] == [0, 4, 4, 0]
    assert layer_split_problem([0, 4, 4, 0], 8, 4) is None


@pytest.mark.parametrize(
    "counts, expected",
    [([2, 2, 2], "must list 4 non-negative layer counts"), ([2, 2, 2, 3], "adding up to n_layers=8"),
     ([4, 0, 2, 2], "only the first and last stage may hold no layers")],
)
def test_bad_layer_counts(counts, expected):
    split = ",".join(map(str, counts))
    cfg = load_config(["model.n_layers=8", "parallel.pp=4", f"parallel.pp_layers=[{split}]", "train.micro_batch=4"])
    with pytest.raises(ConfigError) as error:
        ParallelDims.from_config(cfg.parallel, 4, cfg.model, cfg.train)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_stage_placement_loop_and_v():
    loop = plan_pipeline(CFG, 2, 2, "interleaved_1f1b", [])
    assert loop.stages_of_rank(0) == [0, 2] and loop.stages_of_rank(1) == [1, 3]
    v = plan_pipeline(CFG, 2, 2, "zero_bubble", [])
    assert v.stages_of_rank(0) == [0, 3] and v.stages_of_rank(1) == [1, 2]


def test_stage_keeps_its_layers_and_ends():
    plan = plan_pipeline(CFG, 2, 1, "1f1b", [3, 5])
    first, last = build_stage(CFG, plan, 0), build_stage(CFG, plan, 1)
    assert list(first.layers) == ["0", "1", "2"] and first.output is None and first.tok_embeddings is not None
    assert list(last.layers) == ["3", "4", "5", "6", "7"] and last.tok_embeddings is None and last.output is not None
    whole = {n for n, _ in build_model(CFG).named_parameters()}
    assert {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()} == whole


@pytest.mark.parametrize(
    "pp, vpp, schedule, micro, expected",
    [
        (4, 1, "1f1b", 2, "1f1b needs at least pp micro-batches"),
        (2, 2, "1f1b", 4, "1f1b runs one stage per rank"),
        (2, 1, "interleaved_1f1b", 4, "interleaved_1f1b needs vpp >= 2"),
        (2, 3, "zero_bubble", 4, "V schedule with exactly two stages per rank"),
        (2, 2, "dualpipev", 3, "dualpipev needs at least 2*pp micro-batches"),
        (2, 2, "zero_bubble", 3, "zero_bubble needs at least 2*pp micro-batches"),
        (4, 2, "interleaved_1f1b", 9, "a multiple of pp"),
        (4, 2, "interleaved_1f1b", 6, "a multiple of pp"),
    ],
)
def test_schedule_requirements_are_one_line(pp, vpp, schedule, micro, expected):
    problem = schedule_problem(schedule, pp, vpp, micro)
    assert problem is not None and expected in str(problem) and "\n" not in str(problem)
