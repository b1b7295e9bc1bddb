"""Clusters as the planner sees them: one kind of device (what a rank drives) and the link tiers between devices.

A tier joins the devices of consecutive blocks of `span` ranks (a node, a supernode) and gives each device a
bandwidth per direction; the last tier joins everything. A process group is costed on the smallest tier that holds
every one of its groups, so where a parallel dimension sits in the rank order (tp innermost, pp outermost, as
`parallel.dims.MESH_DIMS` lays out the mesh) decides which link it uses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from configs.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    # Dense BF16 peak (FP32 on a CPU) of one device, FLOP/s: the MFU denominator.
    peak_flops: float
    memory_bytes: float
    # Bytes/s of the device memory: what bounds norms, activations and optimizer updates.
    memory_bandwidth: float
    # Fraction of peak that training-shaped matmuls reach on this device (see the cluster file for the source).
    matmul_efficiency: float


@dataclass(frozen=True)
class LinkTier:
    name: str
    # Devices in one domain of this tier (consecutive ranks); 0 means the whole cluster.
    span: int
    # Bytes/s per device per direction.
    bandwidth: float
    # Seconds per message step (the alpha of the alpha-beta model).
    latency: float
    # Fraction of `bandwidth` that large collectives reach (bus bandwidth / link rate).
    efficiency: float

    @property
    def effective_bandwidth(self) -> float:
        return self.bandwidth * self.efficiency


@dataclass(frozen=True)
class Cluster:
    name: str
    device: DeviceSpec
    devices_per_node: int
    num_devices: int
    # Ordered from the smallest span to the one joining every device.
    tiers: tuple[LinkTier, ...]
    # Figures measured on this machine (CPU ranks), not taken from a datasheet.
    host: bool = False
    # Device bytes each communicator (process group of more than one rank) holds for its lifetime: HCCL allocates
    # an input and an output buffer of HCCL_BUFFSIZE MB per communicator; 0 where the library's buffers are small
    # enough to live in the unplanned 10% (NCCL).
    comm_buffer_bytes: float = 0.0

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.num_devices / self.devices_per_node)

    def tier_for_group(self, size: int, stride: int) -> LinkTier:
        """Tier that carries a process group of `size` ranks spaced `stride` apart (every such group in the mesh).

        Groups tile the rank space in blocks of size*stride. They all sit inside one domain of a tier when the
        domain is a whole number of blocks; otherwise at least one group straddles two domains and the slower
        tier sets its pace.
        """
        if size <= 1:
            return self.tiers[0]
        block = size * stride
        for tier in self.tiers:
            span = tier.span or self.num_devices
            if span >= self.num_devices or (span % block == 0):
                return tier
        return self.tiers[-1]


@dataclass
class DeviceFields:
    """The device part of a `configs/cluster/*.yaml` file, in the units datasheets use."""

    name: str = "device"
    # Dense BF16 TFLOP/s per device; 0 = measure a matmul on this host (the `local` cluster).
    peak_tflops: float = 0.0
    # GiB per device; 0 = this host's memory shared by its ranks.
    memory_gib: float = 0.0
    # Device memory bandwidth, GB/s; 0 = measure a copy on this host.
    memory_bandwidth_gbs: float = 0.0
    matmul_efficiency: float = 1.0


@dataclass
class TierFields:
    name: str = "link"
    span: int = 0
    bandwidth_gbs: float = 1.0
    latency_us: float = 1.0
    efficiency: float = 1.0


@dataclass
class ClusterConfig:
    """Schema of `configs/cluster/*.yaml`: `num_devices` (0 = every device of the preset) resizes the cluster."""

    name: str = "cluster"
    device: DeviceFields = field(default_factory=DeviceFields)
    devices_per_node: int = 8
    num_nodes: int = 1
    num_devices: int = 0
    tiers: list[TierFields] = field(default_factory=list)
    # Ascend clusters: HCCL_BUFFSIZE in MB (CANN's default, and launch/recipes.py's setting, is 200). Every
    # communicator a rank joins holds 2 x HCCL_BUFFSIZE of device memory (CANN environment variable reference,
    # HCCL_BUFFSIZE); the planner counts it per process group of more than one rank. 0 = no such buffers (NCCL).
    hccl_buffsize_mb: float = 0.0


def build_cluster(cfg: ClusterConfig) -> Cluster:
    """Validate a cluster config and turn it into SI units, measuring this host where the config says 0."""
    if cfg.devices_per_node < 1 or cfg.num_nodes < 1:
        raise ConfigError(
            f"cluster.devices_per_node={cfg.devices_per_node} and cluster.num_nodes={cfg.num_nodes} must be >= 1"
        )
    if cfg.num_devices < 0:
        raise ConfigError(f"cluster.num_devices={cfg.num_devices} must be >= 1 (or 0 for the preset's size)")
    if not cfg.tiers:
        raise ConfigError(f"cluster {cfg.name!r} has no link tiers: add at least one under cluster.tiers")
    host = cfg.device.peak_tflops == 0 or cfg.device.memory_gib == 0 or cfg.device.memory_bandwidth_gbs == 0
    num_devices = cfg.num_devices or (host_cores() if host else cfg.devices_per_node * cfg.num_nodes)
    # Ranks of a measured host share its cores, memory and loopback: a host cluster is one node of every rank.
    devices_per_node = num_devices if host else cfg.devices_per_node
    share = min(1.0, host_cores() / num_devices) if host else 1.0
    device = _device(cfg.device, devices_per_node)
    tiers = []
    for tier in cfg.tiers:
        if tier.span < 0 or tier.bandwidth_gbs <= 0 or tier.latency_us < 0 or not 0 < tier.efficiency <= 1:
            raise ConfigError(
                f"cluster tier {tier.name!r}: span={tier.span} must be >= 0, bandwidth_gbs={tier.bandwidth_gbs} > 0, "
                f"latency_us={tier.latency_us} >= 0 and efficiency={tier.efficiency} in (0, 1]"
            )
        bandwidth, latency = tier.bandwidth_gbs * 1e9 * share, tier.latency_us * 1e-6 / share
        tiers.append(LinkTier(tier.name, tier.span, bandwidth, latency, tier.efficiency))
    tiers.sort(key=lambda t: t.span or math.inf)
    if tiers[-1].span and tiers[-1].span < num_devices:
        raise ConfigError(
            f"cluster {cfg.name!r}: no tier spans cluster.num_devices={num_devices} (largest span {tiers[-1].span}): "
            f"lower num_devices or add a scale-out tier with span 0"
        )
    if cfg.hccl_buffsize_mb < 0:
        raise ConfigError(f"cluster.hccl_buffsize_mb={cfg.hccl_buffsize_mb} must be >= 0")
    return Cluster(cfg.name, device, devices_per_node, num_devices, tuple(tiers), host,
                   2 * cfg.hccl_buffsize_mb * 2**20)


def _device(cfg: DeviceFields, ranks_on_host: int) -> DeviceSpec:
    if cfg.peak_tflops < 0 or cfg.memory_gib < 0 or cfg.memory_bandwidth_gbs < 0:
        raise ConfigError(f"cluster.device {cfg.name!r}: peak_tflops, memory_gib and memory_bandwidth_gbs must be >= 0")
    if not 0 < cfg.matmul_efficiency <= 1:
        raise ConfigError(f"cluster.device.matmul_efficiency={cfg.matmul_efficiency} must lie in (0, 1]")
    share = min(1.0, host_cores() / ranks_on_host)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else measure_host_flops() * share
    memory = cfg.memory_gib * GIB if cfg.memory_gib else host_memory_bytes() / ranks_on_host
    bandwidth = cfg.memory_bandwidth_gbs * 1e9 if cfg.memory_bandwidth_gbs else measure_host_bandwidth() * share
    return DeviceSpec(cfg.name, peak, memory, bandwidth, cfg.matmul_efficiency)


# ---- this host --------------------------------------------------------------------------------------------------


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def measure_host_flops() -> float:
    """FP32 matmul rate of one thread: each rank of a CPU run computes with one thread (OMP_NUM_THREADS=1)."""
    import torch

    from launch.device import measure_matmul_flops
    from models.kernels import kernels_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_matmul_flops(kernels_for("cpu").matmul_kernels(torch.float32), torch.float32, 512, 5)
    finally:
        torch.set_num_threads(threads)


def measure_host_bandwidth(megabytes: int = 64, repeats: int = 5) -> float:
    """Copy rate of one thread (bytes read + written per second)."""
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(megabytes * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return 2 * src.numel() * 4 / best
    finally:
        torch.set_num_threads(threads)


def describe(cluster: Cluster) -> str:
    tiers = ", ".join(
        f"{t.name} ({'all' if not t.span or t.span >= cluster.num_devices else f'span {t.span}'}, "
        f"{t.bandwidth / 1e9:.3g} GB/s/dir x {t.efficiency:g})"
        for t in cluster.tiers
    )
    d = cluster.device
    return (
        f"{cluster.name}: {cluster.num_devices} x {d.name} ({d.peak_flops / 1e12:.3g} TFLOP/s peak"
        f"{' measured' if cluster.host else ''}, {d.memory_bytes / GIB:.3g} GiB, {d.memory_bandwidth / 1e9:.3g} GB/s); "
        f"{cluster.devices_per_node} per node; "
        f"links: {tiers}"
    )

