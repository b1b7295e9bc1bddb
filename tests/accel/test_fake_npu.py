"""The fake NPU (tests/accel/fake_npu): real PyTorch code on device "npu" in CPU-only CI.

Each test runs its snippet in fresh interpreters (renaming PrivateUse1 to "npu" is process-wide and cannot be
undone): `python -c` for one process, two such processes with MASTER_ADDR/MASTER_PORT for two ranks. A snippet ends
with one `RESULT {json}` line (tests/accel/workloads.report), which the test checks; the single-process CPU run of
the same model and data is the reference for every distributed run.

The C++ extension is built once, by the first test (about 40 s on two cores), then cached in TORCH_EXTENSIONS_DIR.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

pytestmark = pytest.mark.accel
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

REPO = Path(__file__).resolve().parents[2]
SNIPPET_TIMEOUT = 240
TOLERANCE = 1e-6  # fp32 losses: equal on npu and CPU, up to a different reduction order across ranks


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
    env.update(extra)
    return env


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the snippet reported nothing:\n{output[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def run(code: str, timeout: float = SNIPPET_TIMEOUT, **env: str) -> dict:
    """Run a snippet in a fresh interpreter (with `env` added to the environment); return its RESULT."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=_env(**env), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"snippet failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    return _result(proc.stdout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(code: str, world: int = 2, timeout: float = SNIPPET_TIMEOUT) -> list[dict]:
    """Run a snippet as `world` ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT set); return each rank's RESULT."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return [_result(output) for output in outputs]


def assert_close(losses: list[float], reference: list[float], tolerance: float = TOLERANCE) -> None:
    assert len(losses) == len(reference)
    for step, (got, want) in enumerate(zip(losses, reference)):
        assert abs(got - want) <= tolerance, f"step {step}: {got} on npu, {want} on CPU\n{losses}\n{reference}"


@pytest.fixture(scope="module", autouse=True)
def built_extension() -> None:
    """Build the extension once, before the tests (several processes would otherwise wait on one build)."""
    run("""
        from tests.accel import fake_npu, workloads
        fake_npu.load_extension()
        workloads.report(ok=True)
    """, timeout=600)


# --- one process ----------------------------------------------------------------------------------------------------

def test_tensors_views_inplace_and_copies_match_cpu():
    result = run("""
        import torch
        from tests.accel import fake_npu, workloads
        fake_npu.install()
        fake_npu.install()  # idempotent
        checks = {}
        a = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
        x = a.to("npu")
        checks["device"] = str(x.device)
        checks["factory_device"] = str(torch.zeros(3, device="npu").device)
        checks["is_npu"] = x.is_npu and not a.is_npu
        def same(npu_tensor, cpu_tensor):
            return npu_tensor.device.type == "npu" and torch.equal(npu_tensor.cpu(), cpu_tensor)
        checks["arith"] = same((x * 2 + x.sin()) / (x.abs() + 1), (a * 2 + a.sin()) / (a.abs() + 1))
        checks["matmul"] = same(x @ x.t(), a @ a.t())
        checks["reduce"] = same(x.sum(0), a.sum(0)) and same(x.softmax(-1), a.softmax(-1))
        # views share memory with their base: writes through them show in the base, and the other way round
        v, w = x[1:4, ::2], a[1:4, ::2]
        checks["slice_strides"] = v.stride() == w.stride() and v.storage_offset() == w.storage_offset()
        v.mul_(10); w.mul_(10)
        t, u = x.t(), a.t()
        t[0].fill_(-1); u[0].fill_(-1)
        x.view(48)[5] = 7.0; a.view(48)[5] = 7.0
        uf, ufc = x.unfold(1, 4, 2), a.unfold(1, 4, 2)  # no native kernel: the fallback must return a view
        uf[2, 1].zero_(); ufc[2, 1].zero_()
        checks["views_write_through"] = same(x, a)
        checks["view_shares_storage"] = x.view(8, 6).untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        try:
            x.t().view(48)
            checks["view_error"] = "no error"
        except RuntimeError as error:
            checks["view_error"] = "view size is not compatible" in str(error)
        # in place and out=
        y, b = x.clone(), a.clone()
        y.add_(1).clamp_(max=2); b.add_(1).clamp_(max=2)
        out, outc = torch.empty(0, device="npu"), torch.empty(0)
        torch.mul(x, 3, out=out); torch.mul(a, 3, out=outc)
        checks["inplace_out"] = same(y, b) and same(out, outc) and out.shape == (6, 8)
        checks["item"] = x[2, 3].item() == a[2, 3].item() and (x > 0).sum().item() == (a > 0).sum().item()
        checks["dtype_copy"] = same(x.to(torch.float64).to(torch.bfloat16), a.to(torch.float64).to(torch.bfloat16))
        checks["int_index"] = same(x[torch.tensor([0, 2]).to("npu")], a[torch.tensor([0, 2])])
        # real accelerators refuse to mix devices; so must the fake
        try:
            x + a
            checks["mixed_devices"] = "no error"
        except RuntimeError as error:
            checks["mixed_devices"] = "same device" in str(error)
        checks["scalar_tensor_ok"] = same(x * torch.tensor(2.0), a * 2)
        st = x.untyped_storage()
        size = st.nbytes()
        st.resize_(0)
        checks["storage_freed"] = st.nbytes() == 0
        st.resize_(size)
        checks["storage_restored"] = st.nbytes() == size
        checks["pinned"] = torch.randn(4).pin_memory().is_pinned()
        checks["module"] = [torch.npu.is_available(), torch.npu.device_count(), torch.npu.current_device(),
                            torch.npu.get_device_name(), torch.npu.is_bf16_supported()]
        s = torch.npu.Stream()
        with torch.npu.stream(s):
            e = torch.npu.Event()
            e.record()
        e.synchronize()
        checks["stream_event"] = e.query() and torch.npu.current_stream().device.type == "npu"
        checks["memory"] = torch.npu.memory_allocated() > 0 and torch.npu.max_memory_allocated() > 0
        workloads.report(**checks)
    """)
    expected = {key: True for key in result}
    expected.update(device="npu:0", factory_device="npu:0", module=[True, 1, 0, "Ascend910B2", True])
    assert result == expected


def test_device_name_follows_fake_npu_soc():
    result = run("""
        import torch
        from tests.accel import fake_npu, workloads
        fake_npu.install()
        workloads.report(name=torch.npu.get_device_name(0))
    """, FAKE_NPU_SOC="Ascend910_9392")
    assert result["name"] == "Ascend910_9392"


def test_small_model_trains_on_npu_as_on_cpu():
    result = run("""
        import torch
        from tests.accel import fake_npu, workloads
        fake_npu.install()
        torch.set_num_threads(1)
        cpu = workloads.tiny_lm()
        npu = workloads.tiny_lm().to("npu")
        ref = workloads.train(cpu, "cpu")
        losses = workloads.train(npu, "npu")
        diff = max((p.detach().cpu() - q.detach()).abs().max().item()
                   for p, q in zip(npu.parameters(), cpu.parameters()))
        workloads.report(ref=ref, losses=losses, param_diff=diff,
                         devices=sorted({str(p.device) for p in npu.parameters()}),
                         grad_devices=sorted({str(p.grad.device) for p in npu.parameters()}))
    """)
    assert result["devices"] == ["npu:0"] and result["grad_devices"] == ["npu:0"]
    assert_close(result["losses"], result["ref"])
    # CPU runs scaled_dot_product_attention with its fused kernel, the npu with the math one: rounding differs
    assert result["param_diff"] < 1e-5


def test_autocast_on_npu_casts_matmuls_to_bf16():
    result = run("""
        import torch
        from tests.accel import fake_npu, workloads
        fake_npu.install()
        torch.set_num_threads(1)
        x = torch.randn(4, 8, device="npu")
        linear = torch.nn.Linear(8, 8).to("npu")
        with torch.autocast("npu", dtype=torch.bfloat16):
            dtypes = [str(linear(x).dtype), str(torch.mm(x, x.t()).dtype), str((x + 1).dtype)]
        ref = workloads.train(workloads.tiny_lm(), "cpu")
        model = workloads.tiny_lm().to("npu")
        opt = workloads.optimizer(model.parameters())
        losses = []
        for batch in workloads.batches():
            batch = batch.to("npu")
            with torch.autocast("npu", dtype=torch.bfloat16):
                loss = workloads.loss_fn(model(batch[:, :-1]), batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        workloads.report(dtypes=dtypes, ref=ref, losses=losses)
    """)
    assert result["dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.float32"]
    assert result["losses"] != result["ref"]  # bf16 matmuls really ran
    assert_close(result["losses"], result["ref"], 0.05)


# --- two ranks --------------------------------------------------------------------------------------------------------

RANK_PRELUDE = """
    import os
    import torch
    import torch.distributed as dist
    from datetime import timedelta
    from tests.accel import fake_npu, workloads
    fake_npu.install(2)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
"""


def test_hccl_collectives_take_npu_tensors_and_refuse_cpu_ones():
    results = run_ranks(RANK_PRELUDE + """
    torch.npu.set_device(rank)
    dist.init_process_group("hccl", timeout=timedelta(seconds=90))
    group = dist.group.WORLD
    checks = {"backend": dist.get_backend(), "group_devices": [str(d) for d in group._device_types]}
    t = torch.full((4,), float(rank + 1), device="npu")
    dist.all_reduce(t)
    checks["all_reduce"] = t.cpu().tolist()
    checks["all_reduce_device"] = str(t.device)
    a = torch.full((2,), float(rank + 1), device="npu")
    dist.all_reduce(a, op=dist.ReduceOp.AVG)
    checks["all_reduce_avg"] = a.cpu().tolist()
    errors = {}
    for name, call in {
        "all_reduce": lambda: dist.all_reduce(torch.ones(2)),
        "broadcast": lambda: dist.broadcast(torch.ones(2), src=0),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(torch.empty(4, device="npu"), torch.ones(2)),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(torch.empty(1), torch.ones(2, device="npu")),
    }.items():
        try:
            call()
            errors[name] = "no error"
        except RuntimeError as error:
            errors[name] = str(error)
    checks["errors"] = errors
    gathered = torch.empty(4, device="npu")
    dist.all_gather_into_tensor(gathered, torch.full((2,), float(rank), device="npu"))
    checks["all_gather_into_tensor"] = gathered.cpu().tolist()
    scattered = torch.empty(2, device="npu")
    dist.reduce_scatter_tensor(scattered, torch.arange(4.0, device="npu"))
    checks["reduce_scatter_tensor"] = scattered.cpu().tolist()
    pieces = [torch.empty(2, device="npu") for _ in range(world)]
    dist.all_gather(pieces, torch.full((2,), float(rank), device="npu"))
    checks["all_gather"] = [p.cpu().tolist() for p in pieces]
    objects = [{"from": rank}] if rank == 0 else [None]
    dist.broadcast_object_list(objects, src=0)
    checks["broadcast_object"] = objects[0]
    if rank == 0:
        dist.send(torch.full((3,), 7.0, device="npu"), 1)
    else:
        received = torch.zeros(3, device="npu")
        dist.recv(received, 0)
        checks["recv"] = received.cpu().tolist()
    # the timeout given at creation is recorded, and so is each later _set_default_timeout. PyTorch's own
    # _set_pg_timeout reaches only gloo and nccl backends: on an hccl group it warns and changes nothing.
    import warnings
    from torch.distributed.distributed_c10d import _set_pg_timeout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _set_pg_timeout(timedelta(seconds=7), group)
    checks["set_pg_timeout_warnings"] = [str(w.message) for w in caught]
    group._set_default_timeout(timedelta(seconds=42))
    checks["timeouts"] = [t.total_seconds() for t in group.timeouts]
    checks["ops"] = dict(group.op_counts)
    workloads.report(**checks)
    workloads.finish()
    """)
    for rank, result in enumerate(results):
        assert result["backend"] == "hccl" and result["group_devices"] == ["npu"]
        assert result["all_reduce"] == [3.0] * 4 and result["all_reduce_device"] == f"npu:{rank}"
        assert result["all_reduce_avg"] == [1.5, 1.5]
        for op_name, message in result["errors"].items():
            assert message.startswith("hccl (fake): tensor on cpu handed to "), (op_name, message)
            assert message.endswith("; HCCL takes npu tensors only"), (op_name, message)
        assert result["errors"]["all_reduce"] == (
            "hccl (fake): tensor on cpu handed to allreduce; HCCL takes npu tensors only")
        assert result["all_gather_into_tensor"] == [0.0, 0.0, 1.0, 1.0]
        assert result["reduce_scatter_tensor"] == ([0.0, 2.0] if rank == 0 else [4.0, 6.0])
        assert result["all_gather"] == [[0.0, 0.0], [1.0, 1.0]]
        assert result["broadcast_object"] == {"from": 0}
        if TORCH_VERSION < (2, 14):
            # torch's own helper warns and returns for any backend but gloo and NCCL: only our call took effect
            assert result["timeouts"] == [90.0, 42.0]
            assert result["set_pg_timeout_warnings"] == ["Set timeout is now only supported for either nccl or gloo."]
        else:  # torch 2.14 hands the timeout to any backend that takes one
            assert result["timeouts"] == [90.0, 7.0, 42.0]
    assert results[1]["recv"] == [7.0, 7.0, 7.0]


def test_ddp_on_npu_matches_cpu():
    results = run_ranks(RANK_PRELUDE + """
    from torch.nn.parallel import DistributedDataParallel as DDP
    reference = workloads.reference_losses()
    torch.npu.set_device(rank)
    dist.init_process_group("hccl")
    model = DDP(workloads.tiny_lm().to("npu"))
    per_rank = workloads.GLOBAL_BATCH // world
    data = workloads.batches()[:, rank * per_rank:(rank + 1) * per_rank]
    def mean_over_ranks(loss):
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss
    losses = workloads.train(model, "npu", data, mean_over_ranks)
    workloads.report(ref=reference, losses=losses, device=str(next(model.parameters()).device),
                     ops=dict(dist.group.WORLD.op_counts))
    workloads.finish()
    """)
    for rank, result in enumerate(results):
        assert result["device"] == f"npu:{rank}"
        assert result["ops"]["allreduce"] >= 4  # gradient buckets went through hccl
        assert_close(result["losses"], result["ref"], 1e-5)


@pytest.mark.parametrize("schedule", ["Schedule1F1B", "ScheduleGPipe"])
def test_pipelining_on_npu_matches_cpu(schedule):
    results = run_ranks(RANK_PRELUDE + f"""
    from torch.distributed.pipelining import PipelineStage, {schedule} as Schedule
    reference = workloads.reference_losses()
    torch.npu.set_device(rank)
    dist.init_process_group("hccl")
    layers = list(workloads.tiny_lm())
    part = torch.nn.Sequential(*(layers[:2] if rank == 0 else layers[2:])).to("npu")
    stage = PipelineStage(part, rank, world, torch.device("npu", rank))
    schedule = Schedule(stage, n_microbatches=2, loss_fn=workloads.loss_fn)
    opt = workloads.optimizer(part.parameters())
    losses = []
    for batch in workloads.batches():
        batch = batch.to("npu")
        opt.zero_grad()
        if rank == 0:
            schedule.step(batch[:, :-1])
            loss = torch.zeros((), device="npu")
        else:
            microbatch_losses = []
            schedule.step(target=batch[:, 1:], losses=microbatch_losses)
            loss = torch.stack(microbatch_losses).mean()
        opt.step()
        dist.broadcast(loss, src=world - 1)
        losses.append(loss.item())
    workloads.report(ref=reference, losses=losses, ops=dict(dist.group.WORLD.op_counts))
    workloads.finish()
    """)
    for result in results:
        assert result["ops"]["send"] > 0 and result["ops"]["recv"] > 0
        assert_close(result["losses"], result["ref"])


def test_fsdp2_on_npu_matches_cpu():
    results = run_ranks(RANK_PRELUDE + """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    reference = workloads.reference_losses()
    torch.npu.set_device(rank)
    dist.init_process_group("hccl")
    mesh = init_device_mesh("npu", (world,))
    model = workloads.tiny_lm().to("npu")
    for block in list(model)[1:3]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    per_rank = workloads.GLOBAL_BATCH // world
    data = workloads.batches()[:, rank * per_rank:(rank + 1) * per_rank]
    def mean_over_ranks(loss):
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss
    losses = workloads.train(model, "npu", data, mean_over_ranks)
    param = next(model.parameters())
    ops = {}
    for group in fake_npu.hccl.groups():
        for name, count in group.op_counts.items():
            ops[name] = ops.get(name, 0) + count
    workloads.report(ref=reference, losses=losses, param=type(param).__name__,
                     local_device=str(param.to_local().device), ops=ops)
    workloads.finish()
    """)
    for rank, result in enumerate(results):
        assert result["param"] == "DTensor" and result["local_device"] == f"npu:{rank}"
        assert result["ops"]["all_gather_single"] > 0 and result["ops"]["reduce_scatter_single"] > 0
        assert_close(result["losses"], result["ref"], 1e-5)


def test_tensor_parallel_on_npu_matches_cpu():
    results = run_ranks(RANK_PRELUDE + """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    reference = workloads.reference_losses()
    torch.npu.set_device(rank)
    dist.init_process_group("hccl")
    mesh = init_device_mesh("npu", (world,))
    model = workloads.tiny_lm().to("npu")
    plan = {"3.out": ColwiseParallel(output_layouts=Replicate())}  # all-gathers the logits
    for block in (1, 2):
        plan[f"{block}.mlp.up"] = ColwiseParallel()
        plan[f"{block}.mlp.down"] = RowwiseParallel()  # all-reduces the MLP output
    parallelize_module(model, mesh, plan)
    # DTensor and plain parameters cannot share one foreach call (as on any device): the per-tensor AdamW
    losses = workloads.train(model, "npu", foreach=False)
    weight = model[1].mlp.up.weight
    workloads.report(ref=reference, losses=losses, local_shape=list(weight.to_local().shape),
                     local_device=str(weight.to_local().device), ops=dict(dist.group.WORLD.op_counts))
    workloads.finish()
    """)
    for rank, result in enumerate(results):
        assert result["local_shape"] == [64, 32] and result["local_device"] == f"npu:{rank}"
        assert result["ops"]["allreduce"] > 0
        assert_close(result["losses"], result["ref"])


def test_distributed_checkpoint_of_fsdp2_on_npu_resumes_exactly(tmp_path):
    results = run_ranks(RANK_PRELUDE + f"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.npu.set_device(rank)
    dist.init_process_group("hccl")
    mesh = init_device_mesh("npu", (world,))
    def build():
        model = workloads.tiny_lm().to("npu")
        for block in list(model)[1:3]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, workloads.optimizer(model.parameters())
    per_rank = workloads.GLOBAL_BATCH // world
    data = workloads.batches()[:, rank * per_rank:(rank + 1) * per_rank].to("npu")
    def step(model, opt, batch):
        loss = workloads.loss_fn(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss.item()
    model, opt = build()
    step(model, opt, data[0]); step(model, opt, data[1])
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({{"model": model_state, "optim": optim_state}}, checkpoint_id={str(tmp_path)!r})
    straight_on = [step(model, opt, data[2]), step(model, opt, data[3])]
    model, opt = build()
    model_state, optim_state = get_state_dict(model, opt)
    state = {{"model": model_state, "optim": optim_state}}
    dcp.load(state, checkpoint_id={str(tmp_path)!r})
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = [step(model, opt, data[2]), step(model, opt, data[3])]
    workloads.report(straight_on=straight_on, resumed=resumed)
    workloads.finish()
    """)
    for result in results:
        assert result["resumed"] == result["straight_on"]
