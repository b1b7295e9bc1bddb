"""Context parallelism on real gloo ranks.

Attention alone: each implementation's output and q, k, v gradients on a rank's chunks equal attention over the
whole sequence in one process (fp64, 1e-10), for grouped-query heads, MLA-like widths and packed documents.

Training: per-step loss and gradient norm equal the single-process run (fp32, 1e-5) for cp=2 and cp=4 with each
implementation (and with selective and full recompute), cp=2 x fsdp 2, cp=2 x tp 2 (+SP), cp=2 x pp 2 and tiny_moe
at cp=2 x ep 2, with and without document masks (data.reset_attention_at_eod, which the single-process reference
applies too). A checkpoint saved at cp=4 continues at cp=2 with the losses of the unchanged run (DCP reshards; the
data position is global).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cp_workers import attention_against_one_process, write_packed_corpus
from harness import run_ranks
from workers import SMALL, train_run, train_runs

pytestmark = pytest.mark.slow

RTOL = 1e-5
IMPLS = ["ring", "allgather", "ulysses"]
MOE = [
    "model=tiny_moe", "model.d_model=64", "model.n_heads=4", "model.ffn_hidden=128", "model.q_lora_rank=32",
    "model.kv_lora_rank=16", "model.qk_rope_head_dim=8", "model.qk_nope_head_dim=8", "model.v_head_dim=8",
    "model.moe_ffn_hidden=32",
]
BASE = [o for o in SMALL if not o.startswith("model.")]
DENSE = [o for o in SMALL if o.startswith("model.")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("shape", [(4, 2, 16, False), (4, 4, 8, True), (8, 2, 16, True)],
                         ids=["gqa", "mla_widths_docs", "gqa_docs"])
def test_attention_equals_one_process(impl, cp, shape):
    q_heads, kv_heads, v_dim, documents = shape
    results = run_ranks(attention_against_one_process, cp, args=(impl, q_heads, kv_heads, v_dim, documents))
    for rank, diffs in enumerate(results):
        assert all(diffs[key] < 1e-10 for key in "out q k v".split()), (rank, diffs)
    if documents:
        assert results[0]["docs"] >= 2  # the batch really holds several documents


@pytest.mark.parametrize("documents", [False, True], ids=["one_document", "documents"])
def test_ring_cut_into_query_chunks_equals_one_process(documents):
    """The ring bounds the scores it materialises by cutting queries into chunks (here of 1-2 rows)."""
    results = run_ranks(attention_against_one_process, 2, args=("ring", 4, 2, 16, documents, 32, 256))
    for rank, diffs in enumerate(results):
        assert all(diffs[key] < 1e-10 for key in "out q k v".split()), (rank, diffs)


# ---- training ---------------------------------------------------------------------------------------------------

DENSE_2 = {f"cp2_{impl}": ["parallel.cp=2", f"parallel.cp_impl={impl}"] for impl in IMPLS}
# Recompute runs the exchanges again in backward, in the same order on every rank.
RECOMPUTED_2 = {"cp2_ring_selective": ["parallel.cp=2", "parallel.recompute=selective"],
                "cp2_ulysses_full": ["parallel.cp=2", "parallel.cp_impl=ulysses", "parallel.recompute=full"]}
DENSE_4 = {
    **{f"cp4_{impl}": ["parallel.cp=4", f"parallel.cp_impl={impl}"] for impl in IMPLS},
    "cp2_fsdp2": ["parallel.cp=2", "parallel.dp_shard=2"],
    "cp2_tp2_sp_ulysses": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                           "parallel.cp_impl=ulysses"],
    "cp2_pp2_allgather": ["parallel.cp=2", "parallel.pp=2", "parallel.cp_impl=allgather"],
}
# Document masks: every implementation at cp=2, and the compositions that cut the batch differently.
DOCS_2 = {f"docs_{name}": layout for name, layout in DENSE_2.items()}
DOCS_4 = {f"docs_{name}": DENSE_4[name]
          for name in ("cp4_ring", "cp2_fsdp2", "cp2_tp2_sp_ulysses", "cp2_pp2_allgather")}
MOE_4 = {"moe_cp2_ep2": ["parallel.cp=2", "parallel.ep=2"],
         "moe_cp2_ep2_ulysses": ["parallel.cp=2", "parallel.ep=2", "parallel.cp_impl=ulysses"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cp")


@pytest.fixture(scope="module")
def corpus(base) -> list[str]:
    path = write_packed_corpus(str(base / "packed"))
    return ["data.source=memmap", f"data.path={path}", "data.reset_attention_at_eod=true"]


def _config(base: Path, name: str, *extra: str) -> list[str]:
    return [*BASE, *extra, f"run.dir={base / name}"]


@pytest.fixture(scope="module")
def references(base, corpus) -> dict:
    return {
        "dense": train_run(_config(base, "single", *DENSE)),
        "docs": train_run(_config(base, "single_docs", *DENSE, *corpus)),
        "packed_unmasked": train_run(_config(base, "single_packed", *DENSE, *corpus[:-1])),
        "moe": train_run(_config(base, "single_moe", *MOE)),
        "moe_docs": train_run(_config(base, "single_moe_docs", *MOE, *corpus)),
    }


@pytest.fixture(scope="module")
def runs(base, corpus) -> dict:
    dense = DENSE
    groups = [
        (2, {**{n: [*dense, *l] for n, l in {**DENSE_2, **RECOMPUTED_2}.items()},
             **{n: [*dense, *l, *corpus] for n, l in DOCS_2.items()}}),
        (4, {**{n: [*dense, *l] for n, l in DENSE_4.items()}, **{n: [*dense, *l, *corpus] for n, l in DOCS_4.items()},
             **{n: [*MOE, *l] for n, l in MOE_4.items()}, "moe_docs_cp2_ep2": [*MOE, *MOE_4["moe_cp2_ep2"], *corpus]}),
    ]
    results = {}
    for world, layouts in groups:
        configs = [_config(base, name, *layout, *(["checkpoint.every=5"] if name == "cp4_ring" else []))
                   for name, layout in layouts.items()]
        output = run_ranks(train_runs, world, args=(configs,), timeout=900)
        results.update({name: output[0][i] for i, name in enumerate(layouts)})
    # Resume the cp=4 run's step-5 checkpoint at cp=2 (ring -> allgather too).
    (base / "cp2_from_cp4" / "checkpoints").mkdir(parents=True)
    shutil.copytree(base / "cp4_ring" / "checkpoints" / "step_5",
                    base / "cp2_from_cp4" / "checkpoints" / "step_5")
    resumed = _config(base, "cp2_from_cp4", *dense, "parallel.cp=2", "parallel.cp_impl=allgather")
    results["cp2_from_cp4"] = run_ranks(train_runs, 2, args=([resumed],))[0][0]
    return results


def _reference_of(name: str) -> str:
    moe = name.startswith("moe")
    docs = "docs" in name
    return {(False, False): "dense", (False, True): "docs", (True, False): "moe", (True, True): "moe_docs"}[moe, docs]


ALL = [*DENSE_2, *RECOMPUTED_2, *DENSE_4, *DOCS_2, *DOCS_4, *MOE_4, "moe_docs_cp2_ep2"]


@pytest.mark.parametrize("name", ALL)
def test_losses_and_grad_norms_equal_one_process(runs, references, name):
    want = references[_reference_of(name)]["steps"]
    got = runs[name]["steps"]
    assert sorted(got) == sorted(want)
    for step in want:
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (step, key)


def test_document_masks_change_the_run(references):
    """On the same packed data, the masked reference differs from plain causal attention: the masks act."""
    masked, plain = references["docs"]["steps"], references["packed_unmasked"]["steps"]
    assert masked[1]["loss"] != pytest.approx(plain[1]["loss"], rel=1e-4)


def test_checkpoint_reshards_across_cp(runs, references):
    resumed, want = runs["cp2_from_cp4"]["steps"], references["dense"]["steps"]
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(want[step]["loss"], rel=RTOL)
