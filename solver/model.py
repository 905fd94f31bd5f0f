"""The planning domain: plain frozen dataclasses, units in field names.

Nothing here knows about protobuf, files or solvers. Ids are strings. Mappings
(``throughput``, ``labels``...) are plain dicts by convention never mutated after
construction; sequences are tuples.

Semantics decided here (DESIGN.md is silent on them):

* A training job is a *gang*: all of its GPUs are of one type and it is placed
  whole or not at all. If its GPU count fits on one node of the chosen type it
  runs on one node. Otherwise (allowed only when ``locality`` is not ``node``)
  it takes ``ceil(gpus / node_gpus)`` whole, otherwise idle nodes of that type
  inside one locality group (a domain, a zone, or anywhere), with the GPUs
  split as evenly as possible across them, as torchrun expects. The nodes of
  one gang are of one kind: same GPU type, GPU count and host resources, and
  the same values of the labels that workloads' selectors name (labels no
  selector names, such as a hostname, do not matter).
* An elastic job lists several :class:`GangShape` (GPU count, throughput per
  type); the planner picks at most one.
* An inference service runs replicas of ``gpus_per_replica[type]`` GPUs, each on
  one node. If it is placed at all it gets at least ``min_replicas`` and at most
  ``max_replicas``. ``spread`` = zone | domain | node means no single such unit
  holds more than ``ceil(replicas / units)`` of its replicas, where ``units`` is
  the number of such units that have a ready node of the service's GPU type
  (all replicas of a service use one type) with the selector's labels and
  GPUs for one replica: Kubernetes' topology spread with maxSkew 1 over the
  eligible units.
* ``Problem.current`` is what runs now. Those workloads are re-planned with the
  rest; keeping one where it is costs nothing, moving or stopping it counts as
  a migration. A non-preemptible training job that runs now is kept where it is.
* Nodes that are draining or down receive nothing new; workloads currently on
  them are moved (draining) or treated as not running (down).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "GangShape",
    "GpuType",
    "InferenceSpec",
    "Locality",
    "Node",
    "NodeState",
    "Placement",
    "Plan",
    "PlanMetrics",
    "PlanOptions",
    "PlanStatus",
    "Problem",
    "Reason",
    "ReasonCode",
    "Shard",
    "Shortfall",
    "Spread",
    "Tenant",
    "TrainingSpec",
    "Unplaced",
    "Workload",
]


class NodeState(enum.Enum):
    READY = "ready"
    DRAINING = "draining"
    DOWN = "down"


class Locality(enum.Enum):
    """Where the GPUs of one training gang may be spread."""

    NODE = "node"
    DOMAIN = "domain"
    ZONE = "zone"
    ANY = "any"


class Spread(enum.Enum):
    """The failure unit an inference service's replicas are spread over."""

    NONE = "none"
    NODE = "node"
    DOMAIN = "domain"
    ZONE = "zone"


@dataclass(frozen=True)
class GpuType:
    """A kind of accelerator.

    Attributes:
        name: unique id, e.g. ``h100-80g``.
        memory_gib: memory of one GPU.
        cost_per_hour: price of one GPU for one hour, if known (the ``cost``
            policy treats an unknown price as 0).
    """

    name: str
    memory_gib: float
    cost_per_hour: float | None = None


@dataclass(frozen=True)
class Node:
    """A machine with ``gpus`` GPUs of one type.

    Attributes:
        id: unique id.
        gpu_type: name of a :class:`GpuType`.
        gpus: number of GPUs.
        cpus: CPU cores available to workloads.
        memory_gib: host memory available to workloads.
        zone: failure zone (empty: none given).
        domain: fast-interconnect group inside the zone, e.g. a rack.
        labels: free-form labels that workloads can select on.
        state: only ready nodes receive new work.
    """

    id: str
    gpu_type: str
    gpus: int
    cpus: float = 0.0
    memory_gib: float = 0.0
    zone: str = ""
    domain: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    state: NodeState = NodeState.READY


@dataclass(frozen=True)
class Tenant:
    """A team with a GPU quota.

    Attributes:
        name: unique id.
        max_gpus: most GPUs in total its workloads may hold (None: no limit).
        max_gpus_per_type: most GPUs of each named type.
        weight: share used by the ``fairness`` policy (workload weights multiply it).
    """

    name: str
    max_gpus: int | None = None
    max_gpus_per_type: Mapping[str, int] = field(default_factory=dict)
    weight: float = 1.0


@dataclass(frozen=True)
class GangShape:
    """One way to run a training job: a GPU count and what it achieves.

    Attributes:
        gpus: GPUs in the gang.
        throughput: work units per second of the whole gang, per GPU type.
            Types missing here cannot run this shape.
    """

    gpus: int
    throughput: Mapping[str, float]


@dataclass(frozen=True)
class TrainingSpec:
    """A gang-scheduled training job.

    Attributes:
        shapes: the allowed GPU counts with their throughputs (one for a fixed
            gang, several for an elastic job).
        gpu_memory_gib: memory needed on each GPU.
        cpus_per_gpu: host CPU cores needed per GPU.
        memory_gib_per_gpu: host memory needed per GPU.
        locality: how far its GPUs may be spread.
        remaining_work: work units left (used by ``sjf`` and for completion time).
        deadline_s: seconds from now by which it should finish (reported).
        preemptible: whether a running job may be moved or stopped.
    """

    shapes: tuple[GangShape, ...]
    gpu_memory_gib: float = 0.0
    cpus_per_gpu: float = 0.0
    memory_gib_per_gpu: float = 0.0
    locality: Locality = Locality.ANY
    remaining_work: float | None = None
    deadline_s: float | None = None
    preemptible: bool = True


@dataclass(frozen=True)
class InferenceSpec:
    """A replicated inference service.

    Attributes:
        gpus_per_replica: GPUs one replica needs, per GPU type it can use.
        replica_rps: requests/s one replica sustains within the SLO, per type.
        target_rps: the demand to serve.
        min_replicas: fewest replicas if it runs at all.
        max_replicas: most replicas (None: no limit).
        cpus_per_replica: host CPU cores per replica.
        memory_gib_per_replica: host memory per replica.
        spread: failure unit the replicas are spread over.
    """

    gpus_per_replica: Mapping[str, int]
    replica_rps: Mapping[str, float]
    target_rps: float
    min_replicas: int = 1
    max_replicas: int | None = None
    cpus_per_replica: float = 0.0
    memory_gib_per_replica: float = 0.0
    spread: Spread = Spread.NONE


@dataclass(frozen=True)
class Workload:
    """A training job or an inference service (exactly one of the two specs).

    Attributes:
        id: unique id.
        tenant: name of a :class:`Tenant` (empty: no tenant, no quota).
        priority: higher tiers are never left out to make room for lower ones.
        weight: relative importance inside a tier.
        allowed_gpu_types: GPU types it may use (empty: any it has numbers for).
        node_selector: labels a node must carry to host it.
        submit_time_s: submission time, for ``fcfs`` (smaller is earlier).
        training: the training spec, for a training job.
        inference: the inference spec, for a service.
    """

    id: str
    tenant: str = ""
    priority: int = 0
    weight: float = 1.0
    allowed_gpu_types: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    submit_time_s: float = 0.0
    training: TrainingSpec | None = None
    inference: InferenceSpec | None = None

    @property
    def is_training(self) -> bool:
        return self.training is not None


@dataclass(frozen=True)
class Shard:
    """Some GPUs of one node given to a workload (for a service: one replica)."""

    node_id: str
    gpus: int


@dataclass(frozen=True)
class Placement:
    """Where one workload runs.

    Attributes:
        workload_id: the workload.
        shards: its GPUs per node (for an inference service, one shard per replica).
        gpu_type: the GPU type all shards use (filled by the planner; optional in input).
    """

    workload_id: str
    shards: tuple[Shard, ...]
    gpu_type: str = ""

    @property
    def gpus(self) -> int:
        return sum(s.gpus for s in self.shards)


@dataclass(frozen=True)
class Problem:
    """Everything one plan is made from.

    Attributes:
        gpu_types: the GPU types.
        nodes: the inventory.
        tenants: tenants and quotas.
        workloads: training jobs and inference services to place.
        current: what runs now (for re-planning); empty for a fresh plan.
    """

    gpu_types: tuple[GpuType, ...]
    nodes: tuple[Node, ...]
    workloads: tuple[Workload, ...]
    tenants: tuple[Tenant, ...] = ()
    current: tuple[Placement, ...] = ()


class PlanStatus(enum.Enum):
    OPTIMAL = "OPTIMAL"  # proven optimal within the requested relative gap
    FEASIBLE = "FEASIBLE"  # a verified plan with a known gap that is larger
    HEURISTIC = "HEURISTIC"  # a baseline's plan: no optimality claim
    INFEASIBLE = "INFEASIBLE"  # the model itself is infeasible (a bug or bad current plan)


class ReasonCode(enum.Enum):
    NO_GPU_TYPE = "NO_GPU_TYPE"  # no allowed type has numbers, memory or nodes for it
    NO_NODE = "NO_NODE"  # no ready node of an allowed type matches
    TOO_LARGE = "TOO_LARGE"  # larger than any node / locality group can ever hold
    QUOTA = "QUOTA"  # its tenant's quota binds
    HIGHER_PRIORITY = "HIGHER_PRIORITY"  # capacity held by higher-priority workloads
    CAPACITY = "CAPACITY"  # capacity held by equal or lower-priority work the policy prefers
    SPREAD = "SPREAD"  # spread rules leave too few failure units
    MIGRATION_LIMIT = "MIGRATION_LIMIT"  # max_migrations forbids the moves needed
    PACKING = "PACKING"  # fits in aggregate but not on concrete nodes


@dataclass(frozen=True)
class Reason:
    code: ReasonCode
    message: str


@dataclass(frozen=True)
class Unplaced:
    workload_id: str
    reasons: tuple[Reason, ...]


@dataclass(frozen=True)
class Shortfall:
    """An inference service that is placed but serves less than its target."""

    workload_id: str
    served_rps: float
    target_rps: float
    reasons: tuple[Reason, ...]


@dataclass(frozen=True)
class PlanMetrics:
    gpus_used: int = 0
    gpus_total: int = 0
    cost_per_hour: float = 0.0
    normalized_throughput: float = 0.0  # Σ weight × normalized throughput of training
    served_fraction: float = 0.0  # Σ weight × min(1, served/target) of services
    migrations: int = 0
    placed: int = 0
    unplaced: int = 0


@dataclass(frozen=True)
class Plan:
    """The answer.

    Attributes:
        status: see :class:`PlanStatus`.
        policy: the policy that made it.
        objective: the policy's objective of this (verified, concrete) plan.
        best_bound: a proven bound on that objective (None for baselines).
        gap: relative gap |bound − objective| / max(|bound|, 1e-9) (None for baselines).
        placements: where each placed workload runs.
        unplaced: each workload left out with the reasons that bind.
        shortfalls: services placed below their target, with reasons.
        stage_times_s: wall time of each pipeline stage.
        shadow_prices: marginal objective of one more GPU of each type (LP duals).
        metrics: summary figures.
        work_s: the deterministic work the plan took, in work seconds (``solver.clock``).
        stopped_by: why the search ended: ``gap`` (proven within the relative gap),
            ``work_limit`` (its work budget was spent: the same input, seed and
            limit give the same plan on any machine, loaded or not), ``wall_clock``
            (the wall-time safety cap cut it: this plan may differ from run to run),
            ``exhausted`` (every step of the search ran within the budget; the gap
            left is what its methods could not close) or ``heuristic`` (a baseline
            policy, which does not search).
    """

    status: PlanStatus
    policy: str
    objective: float
    best_bound: float | None
    gap: float | None
    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...] = ()
    shortfalls: tuple[Shortfall, ...] = ()
    stage_times_s: Mapping[str, float] = field(default_factory=dict)
    shadow_prices: Mapping[str, float] = field(default_factory=dict)
    metrics: PlanMetrics = field(default_factory=PlanMetrics)
    work_s: float = 0.0
    stopped_by: str = "heuristic"

    def placement(self, workload_id: str) -> Placement | None:
        for p in self.placements:
            if p.workload_id == workload_id:
                return p
        return None


# The default work budget, as a share of the wall-clock limit: one work second is
# about one CPU second of the reference machine (solver.clock), and the plan's
# uncounted steps (model building, verification, explanations) and a machine
# slower or busier than the reference need the rest before the cap cuts the
# search (see docs/determinism in the README).
WORK_SHARE = 0.5


@dataclass(frozen=True)
class PlanOptions:
    """How to plan.

    Attributes:
        time_limit_s: wall-clock cap on the whole plan, a safety net: the search
            stops at its work budget (``work_limit_s``); only where the machine is
            so slow or loaded that the cap comes first do the stages stop at it,
            early enough to leave time for packing, verification and explanations,
            and the plan says ``stopped_by: wall_clock``.
        work_limit_s: the search's budget of deterministic work, in work seconds
            (``solver.clock``: about a CPU second each on the reference 2-core
            machine). None: ``WORK_SHARE`` of ``time_limit_s``.
        seed: random seed for the solver (same seed, same input, same work limit:
            the same plan, unless the wall-clock cap cut it).
        relative_gap: stop once the plan is proven this close to the bound.
        backend: ``highs`` (HiGHS + GLOP), ``ortools`` (CP-SAT + GLOP) or ``pulp`` (CBC).
        max_migrations: most running workloads that may be moved or stopped.
        migration_penalty: objective cost of moving or stopping one running workload,
            in the policy's objective units.
        num_workers: CP-SAT search workers.
        progress: called with (stage name, seconds elapsed) as stages start.
    """

    time_limit_s: float = 10.0
    work_limit_s: float | None = None
    seed: int = 0
    relative_gap: float = 1e-4
    backend: str = "highs"
    max_migrations: int | None = None
    migration_penalty: float = 0.05
    num_workers: int = 1
    progress: Callable[[str, float], None] | None = None

    def work_budget(self) -> float:
        """The search's work budget (work seconds)."""
        return self.work_limit_s if self.work_limit_s is not None else WORK_SHARE * self.time_limit_s
