"""What stored placements hold, in the stored documents' own terms.

A placement document (``{"gpu_type", "shards": [{"node_id", "gpus"}], ...}``)
holds, on each of its nodes, GPUs and the host CPUs and memory the workload's
spec asks for them (training: ``cpus_per_gpu`` and ``memory_gib_per_gpu`` per
GPU; a service: ``cpus_per_replica`` and ``memory_gib_per_replica`` per
replica, one shard each), and counts against its tenant's quotas per GPU type.
The same rules as the solver's verifier (``solver/verify.py``, rules 3 and 7):
a node whose ``cpus`` (or ``memory_gib``) is 0 does not track that resource.

Used where placements are made or checked outside a plan: the admission of new
work into free capacity (``server.admission``) and the store applying a plan
that admissions happened beside (``Store.apply_plan``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Usage", "Use", "least_gpus", "node_fits", "over_quota", "placement_use", "ready"]

EPS = 1e-9


@dataclass
class Use:
    """GPUs, host CPUs and host memory (GiB) held on one node."""

    gpus: float = 0.0
    cpus: float = 0.0
    memory_gib: float = 0.0

    def add(self, other: Use, sign: float = 1.0) -> None:
        self.gpus += sign * other.gpus
        self.cpus += sign * other.cpus
        self.memory_gib += sign * other.memory_gib


def placement_use(spec: Mapping[str, Any], placement: Mapping[str, Any]) -> dict[str, Use]:
    """Node id -> what ``placement`` holds there, for a workload of ``spec`` (a
    service's placement may carry the spec of the version it runs: that one counts)."""
    spec = placement.get("spec") or spec
    out: dict[str, Use] = {}
    training = spec.get("training")
    inference = spec.get("inference")
    for shard in placement.get("shards", ()):
        node, gpus = str(shard.get("node_id", "")), float(shard.get("gpus", 0) or 0)
        if training is not None:
            use = Use(
                gpus,
                gpus * float(training.get("cpus_per_gpu", 0) or 0),
                gpus * float(training.get("memory_gib_per_gpu", 0) or 0),
            )
        else:
            inf = inference or {}
            use = Use(
                gpus,
                float(inf.get("cpus_per_replica", 0) or 0),
                float(inf.get("memory_gib_per_replica", 0) or 0),
            )
        out.setdefault(node, Use()).add(use)
    return out


def ready(node: Mapping[str, Any]) -> bool:
    """Whether new work may go on ``node`` (a node document)."""
    return str(node.get("state", "") or "ready") == "ready"


def node_fits(node: Mapping[str, Any], use: Use) -> bool:
    """Whether ``use`` fits on ``node`` (rule 3: CPUs and memory only where tracked)."""
    if use.gpus > int(node.get("gpus", 0) or 0) + EPS:
        return False
    cpus, memory = float(node.get("cpus", 0) or 0), float(node.get("memory_gib", 0) or 0)
    if cpus > 0 and use.cpus > cpus + EPS:
        return False
    return not (memory > 0 and use.memory_gib > memory + EPS)


@dataclass
class Usage:
    """What a set of placements holds: per node, and per tenant and GPU type."""

    nodes: dict[str, Use] = field(default_factory=dict)
    tenants: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, tenant: str, gpu_type: str, held: Mapping[str, Use], sign: float = 1.0) -> None:
        for node, use in held.items():
            self.nodes.setdefault(node, Use()).add(use, sign)
        by_type = self.tenants.setdefault(tenant, {})
        by_type[gpu_type] = by_type.get(gpu_type, 0.0) + sign * sum(u.gpus for u in held.values())

    def node(self, node_id: str) -> Use:
        return self.nodes.get(node_id, Use())


def over_quota(tenant: Mapping[str, Any] | None, held: Mapping[str, float]) -> bool:
    """Whether a tenant holding ``held`` GPUs per type breaks its quotas (rule 7)."""
    if tenant is None:
        return False
    limit = tenant.get("max_gpus")
    if limit is not None and sum(held.values()) > float(limit) + EPS:
        return True
    per_type: Mapping[str, Any] = tenant.get("max_gpus_per_type") or {}
    return any(held.get(t, 0.0) > float(cap) + EPS for t, cap in per_type.items())


def least_gpus(spec: Mapping[str, Any]) -> int:
    """The fewest GPUs a workload of ``spec`` can run on (0: it cannot run anywhere)."""
    training = spec.get("training")
    if training is not None:
        sizes = [int(training.get("gpus", 0) or 0)]
        sizes += [int(e.get("gpus", 0) or 0) for e in training.get("elastic", ())]
        return min((g for g in sizes if g > 0), default=0)
    inference = spec.get("inference") or {}
    per_replica = [int(g) for g in (inference.get("gpus_per_replica") or {}).values() if int(g) > 0]
    return max(1, int(inference.get("min_replicas", 1) or 1)) * min(per_replica, default=0)
