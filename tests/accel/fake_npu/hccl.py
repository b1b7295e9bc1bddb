"""A fake "hccl" process-group backend for the fake npu: strict about devices, gloo underneath.

Each group is a Python `torch.distributed.ProcessGroup` (PyTorch routes both the Python API and C++ callers such
as DDP's reducer to its methods) that

* raises ``RuntimeError("hccl (fake): tensor on cpu handed to allreduce; HCCL takes npu tensors only")`` when any
  tensor it is handed is not on an npu, as real HCCL refuses host tensors;
* otherwise copies the npu tensors to CPU, runs the same collective with a gloo backend over the same store, and
  copies the results back;
* remembers the timeout it was created with and each later ``_set_default_timeout`` (the method torch_npu's
  ProcessGroupHCCL has), and counts the operations it ran, for tests to read: ``groups()`` lists every group.

Collectives complete before they return (the fake device is synchronous); send and recv are asynchronous, as
pipeline schedules post them in batches and wait later.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch._C._distributed_c10d as c10d
from torch._C._distributed_c10d import _create_work_from_future

BACKEND = "hccl"
_all_groups: list["weakref.ref[FakeHCCLGroup]"] = []


def groups() -> list["FakeHCCLGroup"]:
    """Every fake hccl group this process created and still holds, oldest first."""
    return [g for g in (ref() for ref in _all_groups) if g is not None]


def _flatten(tensors: Iterable[Any]) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for item in tensors:
        if isinstance(item, torch.Tensor):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(_flatten(item))
    return flat


def _done(result: Any = None) -> dist.Work:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(result)
    return _create_work_from_future(future)


class _AsyncWork(dist._Work):
    """A gloo work plus what to do when it completes (copy received data back to the npu tensors)."""

    def __init__(self, inner: dist.Work, finish: Optional[Callable[[], None]], result: list[torch.Tensor]) -> None:
        super().__init__()
        self._inner = inner
        self._finish = finish
        self._result = result
        self._lock = threading.Lock()
        self._finished = False

    def _complete(self) -> None:
        with self._lock:
            if not self._finished:
                if self._finish is not None:
                    self._finish()
                self._finished = True

    def wait(self, timeout: Optional[timedelta] = None) -> bool:
        self._inner.wait()
        self._complete()
        return True

    def is_completed(self) -> bool:
        return self._finished

    def get_future(self) -> torch.futures.Future:
        def then(_: torch.futures.Future) -> list[torch.Tensor]:
            self._complete()
            return self._result

        return self._inner.get_future().then(then)


class FakeHCCLGroup(dist.ProcessGroup):
    """One fake HCCL communicator: checks devices, runs gloo on host copies."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta) -> None:
        super().__init__(rank, size)
        self._rank, self._size = rank, size
        self.timeout = timeout
        self.timeouts: list[timedelta] = [timeout]  # creation, then every _set_default_timeout
        self.op_counts: Counter[str] = Counter()
        self._group_name, self._group_desc = "", ""
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("fake_hccl_gloo/", store), rank, size, timeout)
        # Declare npu as this group's device, as a C++ HCCL backend would be registered: object collectives and
        # barrier then pick npu tensors, as they do with real HCCL.
        self._register_backend(torch.device("npu"), dist.ProcessGroup.BackendType.CUSTOM, None)
        _all_groups.append(weakref.ref(self))

    # --- what tests read and torch_npu's backend offers -----------------------------------------------------------
    def _get_backend(self, device: torch.device) -> "FakeHCCLGroup":
        """torch 2.14's batched point-to-point asks the group for its backend object (for `supports_coalescing`);
        this Python group is its own backend (the one registered for npu above only declares the device)."""
        return self

    def _set_default_timeout(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self.timeouts.append(timeout)

    def set_timeout(self, timeout: timedelta) -> None:
        # ProcessGroup.set_timeout reaches every backend of a group (torch_npu's ProcessGroupHCCL::setTimeout); this
        # group is its own backend.
        self._set_default_timeout(timeout)

    def getBackendName(self) -> str:  # noqa: N802 - the C++ name
        return BACKEND

    def getRank(self) -> int:  # noqa: N802
        return self._rank

    def getSize(self) -> int:  # noqa: N802
        return self._size

    # The C++ base keeps name and description in its backends; this group has none, so it keeps them itself.
    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._group_name = name

    def getGroupName(self) -> str:  # noqa: N802
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._group_desc = desc

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._group_desc

    def abort(self) -> None:
        self._gloo.abort()

    def shutdown(self) -> None:
        self._gloo.shutdown()

    def __repr__(self) -> str:
        return f"FakeHCCLGroup(rank={self._rank}, size={self._size}, timeout={self.timeout})"

    # --- helpers --------------------------------------------------------------------------------------------------
    def _check(self, op: str, *tensors: Any) -> None:
        for tensor in _flatten(tensors):
            if tensor.device.type != "npu":
                raise RuntimeError(f"hccl (fake): tensor on {tensor.device} handed to {op}; "
                                   "HCCL takes npu tensors only")
        self.op_counts[op] += 1

    @staticmethod
    def _host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.detach().cpu() for t in tensors]

    @staticmethod
    def _back(npu: Sequence[torch.Tensor], host: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip(npu, host):
                dst.copy_(src)

    @staticmethod
    def _reduce_op(opts: Any) -> tuple[Any, bool]:
        """The op to run with gloo, and whether to divide by the group size after: gloo has no AVG."""
        op = opts.reduceOp
        if op == dist.ReduceOp.AVG:
            return dist.ReduceOp.SUM, True
        return op, False

    def _average(self, divide: bool, tensors: Sequence[torch.Tensor]) -> None:
        if divide:
            with torch.no_grad():
                for t in tensors:
                    t.div_(self._size)

    # --- collectives ----------------------------------------------------------------------------------------------
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        opts = opts if isinstance(opts, c10d.AllreduceOptions) else _allreduce_opts(opts)
        self._check("allreduce", tensors)
        host = self._host(tensors)
        inner = c10d.AllreduceOptions()
        inner.reduceOp, divide = self._reduce_op(opts)
        self._gloo.allreduce(host, inner).wait()
        self._average(divide, host)
        self._back(tensors, host)
        return _done(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        self._check("allreduce_coalesced", tensors)
        host = self._host(tensors)
        for h in host:
            inner = c10d.AllreduceOptions()
            inner.reduceOp, divide = self._reduce_op(opts)
            self._gloo.allreduce([h], inner).wait()
            self._average(divide, [h])
        self._back(tensors, host)
        return _done(tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        self._check("broadcast", tensors)
        host = self._host(tensors)
        inner = c10d.BroadcastOptions()
        inner.rootRank, inner.rootTensor = opts.rootRank, opts.rootTensor
        self._gloo.broadcast(host, inner).wait()
        self._back(tensors, host)
        return _done(tensors)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        self._check("reduce", tensors)
        host = self._host(tensors)
        inner = c10d.ReduceOptions()
        inner.reduceOp, divide = self._reduce_op(opts)
        inner.rootRank, inner.rootTensor = opts.rootRank, opts.rootTensor
        self._gloo.reduce(host, inner).wait()
        if self._rank == opts.rootRank:
            self._average(divide, host)
            self._back(tensors, host)
        return _done(tensors)

    def allgather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                  opts: Any = None) -> dist.Work:
        self._check("allgather", output_lists, inputs)
        host_out = [self._host(outs) for outs in output_lists]
        self._gloo.allgather(host_out, self._host(inputs), c10d.AllgatherOptions()).wait()
        for outs, hosts in zip(output_lists, host_out):
            self._back(outs, hosts)
        return _done(output_lists)

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                            opts: Any = None) -> dist.Work:
        self._check("allgather_coalesced", output_lists, inputs)
        for outs, tensor in zip(output_lists, inputs):
            host_out = self._host(outs)
            self._gloo.allgather([host_out], self._host([tensor]), c10d.AllgatherOptions()).wait()
            self._back(outs, host_out)
        return _done(output_lists)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        self._check("all_gather_single", output, input)
        self._gather_into(output, input)
        return _done([output])

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                    opts: Any = None) -> dist.Work:
        self._check("all_gather_single_coalesced", outputs, inputs)
        for output, input in zip(outputs, inputs):
            self._gather_into(output, input)
        return _done(outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def _gather_into(self, output: torch.Tensor, input: torch.Tensor) -> None:
        # The output holds the world's inputs one after another (dim 0 of size world*n, or a leading world dim).
        host_out = torch.empty(output.shape, dtype=output.dtype)
        chunks = list(host_out.reshape(self._size, -1).unbind(0))
        self._gloo.allgather([chunks], self._host([input.reshape(-1)]), c10d.AllgatherOptions()).wait()
        self._back([output], [host_out])

    def reduce_scatter(self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]],
                       opts: Any = None) -> dist.Work:
        self._check("reduce_scatter", outputs, input_lists)
        for output, inputs in zip(outputs, input_lists):
            self._reduce_scatter_into(output, [t.reshape(-1) for t in inputs], opts)
        return _done(outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        self._check("reduce_scatter_single", output, input)
        self._reduce_scatter_into(output, list(input.reshape(self._size, -1).unbind(0)), opts)
        return _done([output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: Any = None) -> dist.Work:
        self._check("reduce_scatter_single_coalesced", outputs, inputs)
        for output, input in zip(outputs, inputs):
            self._reduce_scatter_into(output, list(input.reshape(self._size, -1).unbind(0)), opts)
        return _done(outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def _reduce_scatter_into(self, output: torch.Tensor, pieces: list[torch.Tensor], opts: Any) -> None:
        # Gloo's reduce_scatter wants equal host pieces; an allreduce of all of them then keeping ours is the same
        # sum, and exact for what gloo supports.
        host = torch.stack(self._host(pieces))
        inner = c10d.AllreduceOptions()
        inner.reduceOp, divide = self._reduce_op(opts)
        self._gloo.allreduce([host], inner).wait()
        mine = host[self._rank]
        self._average(divide, [mine])
        self._back([output], [mine.reshape(output.shape)])

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> dist.Work:
        self._check("alltoall", outputs, inputs)
        host_out = self._host(outputs)
        self._gloo.alltoall(host_out, self._host(inputs), c10d.AllToAllOptions()).wait()
        self._back(outputs, host_out)
        return _done(outputs)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                          input_split_sizes: list[int], opts: Any = None) -> dist.Work:
        self._check("all_to_all_single", output, input)
        host_out = torch.empty(output.shape, dtype=output.dtype)
        self._gloo.alltoall_base(host_out, self._host([input])[0], list(output_split_sizes),
                                 list(input_split_sizes), c10d.AllToAllOptions()).wait()
        self._back([output], [host_out])
        return _done([output])

    alltoall_base = all_to_all_single

    def gather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
               opts: Any = None) -> dist.Work:
        self._check("gather", output_lists, inputs)
        host_out = [self._host(outs) for outs in output_lists]
        inner = c10d.GatherOptions()
        inner.rootRank = opts.rootRank
        self._gloo.gather(host_out, self._host(inputs), inner).wait()
        for outs, hosts in zip(output_lists, host_out):
            self._back(outs, hosts)
        return _done(output_lists)

    def scatter(self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]],
                opts: Any = None) -> dist.Work:
        self._check("scatter", outputs, input_lists)
        host_out = self._host(outputs)
        inner = c10d.ScatterOptions()
        inner.rootRank = opts.rootRank
        self._gloo.scatter(host_out, [self._host(inputs) for inputs in input_lists], inner).wait()
        self._back(outputs, host_out)
        return _done(outputs)

    def barrier(self, opts: Any = None) -> dist.Work:
        self.op_counts["barrier"] += 1
        self._gloo.barrier(c10d.BarrierOptions()).wait()
        return _done(None)

    # --- point to point: asynchronous, so that a schedule's batched sends and receives cannot deadlock -----------
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        self._check("send", tensors)
        host = self._host(tensors)  # a snapshot: the caller may reuse its tensor once send returns
        return _AsyncWork(self._gloo.send(host, dst, tag), None, tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        self._check("recv", tensors)
        host = self._host(tensors)
        return _AsyncWork(self._gloo.recv(host, src, tag), lambda: self._back(tensors, host), tensors)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> dist.Work:
        self._check("recv_anysource", tensors)
        host = self._host(tensors)
        return _AsyncWork(self._gloo.recv_anysource(host, tag), lambda: self._back(tensors, host), tensors)


def _allreduce_opts(op: Any) -> c10d.AllreduceOptions:
    opts = c10d.AllreduceOptions()
    if op is not None:
        opts.reduceOp = op
    return opts


def _create(store: dist.Store, rank: int, size: int, timeout: timedelta) -> FakeHCCLGroup:
    return FakeHCCLGroup(store, rank, size, timeout)


def register() -> None:
    """Make init_process_group("hccl") and new_group(backend="hccl") create fake HCCL groups, for npu only."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, devices=["npu"])
