"""Pipeline stage cutting and schedule checks, before any process group: layers per stage, stage placement, and
one-line errors for schedules that cannot run."""

import pytest

from models.config import ConfigError
from models.transformer import build_model
from parallel.pipeline import build_stage, plan_pipeline, split_layers
from train.config import load_config

CFG = load_config(["model.n_layers=8"]).model


def test_even_split_gives_spare_layers_to_middle_stages():
    assert [len(s) for s in split_layers(10, 4, [])] == [2, 3, 3, 2]
    assert split_layers(4, 2, []) == ((0, 1), (2, 3))


def test_user_moves_layers_between_stages():
    assert split_layers(8, 4, [1, 3, 3, 1]) == ((0,), (1, 2, 3), (4, 5, 6), (7,))
    assert [len(s) for s in split_layers(8, 4, [0, 4, 4, 0])] == [0, 4, 4, 0]  # ends may carry only embedding / head


@pytest.mark.parametrize(
    "counts, expected",
    [([2, 2, 2], "must list 4 non-negative layer counts"), ([2, 2, 2, 3], "adding up to n_layers=8"),
     ([4, 0, 2, 2], "only the first and last stage may hold no layers")],
)
def test_bad_layer_counts(counts, expected):
    with pytest.raises(ConfigError, match=expected):
        split_layers(8, 4, counts)


def test_stage_placement_loop_and_v():
    loop = plan_pipeline(CFG, 2, 2, "interleaved_1f1b", [], 4)
    assert loop.stages_of_rank(0) == [0, 2] and loop.stages_of_rank(1) == [1, 3]
    v = plan_pipeline(CFG, 2, 2, "zero_bubble", [], 4)
    assert v.stages_of_rank(0) == [0, 3] and v.stages_of_rank(1) == [1, 2]


def test_stage_keeps_its_layers_and_ends():
    plan = plan_pipeline(CFG, 2, 1, "1f1b", [3, 5], 4)
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
        (4, 2, "interleaved_1f1b", 9, "a multiple of pp"),
    ],
)
def test_schedule_requirements_are_one_line(pp, vpp, schedule, micro, expected):
    with pytest.raises(ConfigError) as error:
        plan_pipeline(CFG, pp, vpp, schedule, [], micro)
    assert expected in str(error.value) and "\n" not in str(error.value)
