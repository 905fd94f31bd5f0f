"""Input validation: one pass that reports every broken rule with its path.

``validate(problem)`` returns nothing for a valid problem and otherwise raises
:class:`~solver.errors.ValidationError` listing *every* violation, each with a
path in the scheme of the input files (the proto messages' JSON mapping), with
tuples indexed in file order::

    gpu_types[0].memory_gib: must be > 0
    nodes[3].id: duplicate id "n1" (also nodes[0])
    workloads[1].inference.target_rps: must be > 0
    workloads[2].training.elastic[1].gpus: duplicate GPU count 4 (also elastic[0])
    current[0].shards[1].node_id: unknown node "n9"

Path conventions:

* A training job with exactly one :class:`~solver.model.GangShape` is written
  ``training: {gpus, throughput}`` in files, so its shape is reported at
  ``workloads[i].training.gpus`` / ``.throughput``; with several shapes they are
  ``training.elastic[k].gpus`` / ``.throughput``.
* An unknown key of a map is reported at the map's path with the key in the
  message (``workloads[0].inference.replica_rps: unknown GPU type "h200"``); a bad
  value at ``map["key"]`` (``tenants[0].max_gpus_per_type["a100"]: must be ≥ 0``).
* A rule about a whole object (``workloads[i]``, ``current[i]``) is reported at
  that object's path.

Rules decided here (DESIGN.md is silent on them):

* Every number must be finite (no NaN, no infinity).
* A node needs at least one GPU (a GPU-less node can host nothing); ``cpus`` and
  ``memory_gib`` may be 0, which means "not tracked" (see ``solver/verify.py``).
* A workload naming a tenant must name a known one, unless no tenants are given
  at all (then there are no quotas and tenant names are labels only).
* A training job needs a positive throughput on at least one known GPU type; a
  service needs at least one GPU type present in both ``gpus_per_replica`` and
  ``replica_rps``. (A job whose *allowed* types rule all of these out is valid
  but unplaceable: the plan reports it as unplaced, not as an error.)
* ``current`` may only name known workloads and nodes, each workload once.
* **Names** (GPU types, node ids, tenant names, workload ids and the tenant a
  workload names) follow one grammar, :data:`NAME_RULE`: 1 to 253 characters,
  letters, digits, ``.``, ``_`` and ``-``, starting and ending with a letter or
  digit. So no name is ``..``, holds a ``/``, a NUL, a newline, an escape
  sequence or a right-to-left override, and every name is safe as a file name
  (the workers build directories from workload ids). A message shows at most
  the first 40 characters of a bad name, escaped.
* **Every number has a range** (:data:`LIMITS`), so no input can make the model
  numerically meaningless or overflow a solver (a ``target_rps`` of 1e300 once
  stopped every planning round): GPUs per node ≤ 1,024, per gang ≤ 65,536, per
  replica ≤ 1,024; requests/s ≤ 1e9 (a replica's at least 1e-6); throughputs
  ≤ 1e12; GPU memory ≤ 1e6 GiB; CPUs ≤ 1e6 and host memory ≤ 1e9 GiB (per node,
  per GPU, per replica); replicas ≤ 100,000; weights in (0, 1e6]; priorities
  within ±1e6; prices ≤ 1e6 $/hour; quotas ≤ 1e9 GPUs; remaining work ≤ 1e15;
  times ≤ 1e12 s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from solver.errors import ValidationError, Violation
from solver.model import InferenceSpec, NodeState, Problem, TrainingSpec, Workload

__all__ = ["LIMITS", "NAME_RULE", "validate"]

NAME_RULE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
"""The grammar of every name (see the module docstring)."""

NAME_HELP = '1-253 letters, digits, ".", "_" or "-", starting and ending with a letter or digit'

LIMITS: dict[str, float] = {
    "node_gpus": 1024,
    "gang_gpus": 65536,
    "replica_gpus": 1024,
    "rps": 1e9,
    "min_replica_rps": 1e-6,
    "throughput": 1e12,
    "gpu_memory_gib": 1e6,
    "cpus": 1e6,
    "memory_gib": 1e9,
    "replicas": 100_000,
    "weight": 1e6,
    "priority": 1e6,
    "price": 1e6,
    "quota": 1e9,
    "work": 1e15,
    "seconds": 1e12,
}
"""The largest (and a few smallest) values each kind of number may take."""


def validate(problem: Problem) -> None:
    """Check ``problem`` against every input rule.

    Raises:
        ValidationError: with one :class:`~solver.errors.Violation` per broken
            rule, in file order, if any rule is broken.
    """
    v = _Collector()
    type_names = _check_gpu_types(problem, v)
    node_ids = _check_nodes(problem, type_names, v)
    tenant_names = _check_tenants(problem, type_names, v)
    workload_ids = _check_workloads(problem, type_names, tenant_names, v)
    _check_current(problem, type_names, node_ids, workload_ids, v)
    if not v.violations:
        _check_pinned_quotas(problem, v)
    if v.violations:
        raise ValidationError(v.violations)


class _Collector:
    """Accumulates violations and offers the common numeric checks."""

    def __init__(self) -> None:
        self.violations: list[Violation] = []

    def add(self, path: str, message: str) -> None:
        self.violations.append(Violation(path, message))

    def positive(self, path: str, value: float, high: float) -> None:
        if not _finite(value):
            self.add(path, "must be finite")
        elif not value > 0:
            self.add(path, "must be > 0")
        else:
            self.at_most(path, value, high)

    def non_negative(self, path: str, value: float, high: float) -> None:
        if not _finite(value):
            self.add(path, "must be finite")
        elif not value >= 0:
            self.add(path, "must be ≥ 0")
        else:
            self.at_most(path, value, high)

    def at_least(self, path: str, value: float, low: float, high: float) -> None:
        if not _finite(value):
            self.add(path, "must be finite")
        elif not value >= low:
            self.add(path, f"must be ≥ {low:g}")
        else:
            self.at_most(path, value, high)

    def at_most(self, path: str, value: float, high: float) -> None:
        if value > high:
            self.add(path, f"must be ≤ {high:g}")

    def finite(self, path: str, value: float, high: float) -> None:
        if not _finite(value):
            self.add(path, "must be finite")
        elif abs(value) > high:
            self.add(path, f"must be between {-high:g} and {high:g}")

    def name(self, path: str, value: str) -> None:
        """``value`` follows :data:`NAME_RULE` (empty names are reported by the caller)."""
        if value and not NAME_RULE.fullmatch(value):
            escaped = ascii(value[:40])[1:-1]
            shown = escaped[:80] + ("…" if len(value) > 40 or len(escaped) > 80 else "")
            self.add(path, f'must be {NAME_HELP}; got "{shown}" ({len(value)} characters)')

    def unique_id(self, path: str, value: str, seen: dict[str, str], what: str = "id") -> None:
        """Non-empty and not seen before; ``seen`` maps each value to the path of its first use."""
        if not value:
            self.add(path, "must not be empty")
        elif not NAME_RULE.fullmatch(value):
            self.name(path, value)
        elif value in seen:
            self.add(path, f'duplicate {what} "{value}" (also {seen[value]})')
        else:
            seen[value] = path.rsplit(".", 1)[0]

    def known_types(self, path: str, names: Iterable[str], known: set[str]) -> None:
        for name in names:
            if name not in known:
                self.add(path, f'unknown GPU type "{name}"')


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _check_gpu_types(problem: Problem, v: _Collector) -> set[str]:
    seen: dict[str, str] = {}
    for i, t in enumerate(problem.gpu_types):
        p = f"gpu_types[{i}]"
        v.unique_id(f"{p}.name", t.name, seen, "name")
        v.positive(f"{p}.memory_gib", t.memory_gib, LIMITS["gpu_memory_gib"])
        if t.cost_per_hour is not None:
            v.non_negative(f"{p}.cost_per_hour", t.cost_per_hour, LIMITS["price"])
    return set(seen)


def _check_nodes(problem: Problem, types: set[str], v: _Collector) -> set[str]:
    seen: dict[str, str] = {}
    for i, n in enumerate(problem.nodes):
        p = f"nodes[{i}]"
        v.unique_id(f"{p}.id", n.id, seen)
        if not n.gpu_type:
            v.add(f"{p}.gpu_type", "must not be empty")
        elif n.gpu_type not in types:
            v.add(f"{p}.gpu_type", f'unknown GPU type "{n.gpu_type}"')
        v.at_least(f"{p}.gpus", n.gpus, 1, LIMITS["node_gpus"])
        v.non_negative(f"{p}.cpus", n.cpus, LIMITS["cpus"])
        v.non_negative(f"{p}.memory_gib", n.memory_gib, LIMITS["memory_gib"])
    return set(seen)


def _check_tenants(problem: Problem, types: set[str], v: _Collector) -> set[str]:
    seen: dict[str, str] = {}
    for i, t in enumerate(problem.tenants):
        p = f"tenants[{i}]"
        v.unique_id(f"{p}.name", t.name, seen, "name")
        if t.max_gpus is not None:
            v.non_negative(f"{p}.max_gpus", t.max_gpus, LIMITS["quota"])
        _check_type_map(f"{p}.max_gpus_per_type", t.max_gpus_per_type, types, v, low=0, high=LIMITS["quota"])
        v.positive(f"{p}.weight", t.weight, LIMITS["weight"])
    return set(seen)


def _check_type_map(
    path: str, values: Mapping[str, float], types: set[str], v: _Collector, *, low: float | None, high: float
) -> None:
    """Keys must be known GPU types; values in [``low``, ``high``] (or (0, ``high``] when
    ``low`` is None)."""
    v.known_types(path, values, types)
    for name, value in values.items():
        key_path = f'{path}["{name}"]'
        if low is None:
            v.positive(key_path, value, high)
        else:
            v.at_least(key_path, value, low, high)


def _check_workloads(problem: Problem, types: set[str], tenants: set[str], v: _Collector) -> set[str]:
    seen: dict[str, str] = {}
    for i, w in enumerate(problem.workloads):
        p = f"workloads[{i}]"
        v.unique_id(f"{p}.id", w.id, seen)
        if w.tenant and not NAME_RULE.fullmatch(w.tenant):
            v.name(f"{p}.tenant", w.tenant)
        elif w.tenant and problem.tenants and w.tenant not in tenants:
            v.add(f"{p}.tenant", f'unknown tenant "{w.tenant}"')
        v.positive(f"{p}.weight", w.weight, LIMITS["weight"])
        v.finite(f"{p}.priority", w.priority, LIMITS["priority"])
        v.finite(f"{p}.submit_time_s", w.submit_time_s, LIMITS["seconds"])
        for k, name in enumerate(w.allowed_gpu_types):
            if name not in types:
                v.add(f"{p}.allowed_gpu_types[{k}]", f'unknown GPU type "{name}"')
        _check_kind(p, w, types, v)
    return set(seen)


def _check_kind(p: str, w: Workload, types: set[str], v: _Collector) -> None:
    if w.training is not None and w.inference is not None:
        v.add(p, "must have exactly one of training or inference, not both")
    elif w.training is not None:
        _check_training(f"{p}.training", w.training, types, v)
    elif w.inference is not None:
        _check_inference(f"{p}.inference", w.inference, types, v)
    else:
        v.add(p, "must have exactly one of training or inference")


def _check_training(p: str, t: TrainingSpec, types: set[str], v: _Collector) -> None:
    if not t.shapes:
        v.add(p, "needs gpus (or elastic shapes)")
    single = len(t.shapes) == 1
    counts: dict[int, int] = {}
    any_positive = False
    for k, shape in enumerate(t.shapes):
        sp = p if single else f"{p}.elastic[{k}]"
        v.at_least(f"{sp}.gpus", shape.gpus, 1, LIMITS["gang_gpus"])
        if not single and _finite(shape.gpus):
            if shape.gpus in counts:
                v.add(f"{sp}.gpus", f"duplicate GPU count {shape.gpus} (also elastic[{counts[shape.gpus]}])")
            else:
                counts[shape.gpus] = k
        v.known_types(f"{sp}.throughput", shape.throughput, types)
        for name, value in shape.throughput.items():
            v.non_negative(f'{sp}.throughput["{name}"]', value, LIMITS["throughput"])
            if name in types and _finite(value) and value > 0:
                any_positive = True
    if t.shapes and not any_positive:
        where = f"{p}.throughput" if single else f"{p}.elastic"
        v.add(where, "needs a positive throughput on at least one known GPU type")
    v.non_negative(f"{p}.gpu_memory_gib", t.gpu_memory_gib, LIMITS["gpu_memory_gib"])
    v.non_negative(f"{p}.cpus_per_gpu", t.cpus_per_gpu, LIMITS["cpus"])
    v.non_negative(f"{p}.memory_gib_per_gpu", t.memory_gib_per_gpu, LIMITS["memory_gib"])
    if t.remaining_work is not None:
        v.positive(f"{p}.remaining_work", t.remaining_work, LIMITS["work"])
    if t.deadline_s is not None:
        v.positive(f"{p}.deadline_s", t.deadline_s, LIMITS["seconds"])


def _check_inference(p: str, s: InferenceSpec, types: set[str], v: _Collector) -> None:
    _check_type_map(f"{p}.gpus_per_replica", s.gpus_per_replica, types, v, low=1, high=LIMITS["replica_gpus"])
    _check_type_map(
        f"{p}.replica_rps", s.replica_rps, types, v, low=LIMITS["min_replica_rps"], high=LIMITS["rps"]
    )
    usable = set(s.gpus_per_replica) & set(s.replica_rps) & types
    if not usable:
        v.add(p, "needs a known GPU type present in both gpus_per_replica and replica_rps")
    v.positive(f"{p}.target_rps", s.target_rps, LIMITS["rps"])
    v.at_least(f"{p}.min_replicas", s.min_replicas, 0, LIMITS["replicas"])
    if s.max_replicas is not None:
        low = max(1, s.min_replicas)
        if not s.max_replicas >= low:
            bound = "1" if low == 1 else f"min_replicas ({s.min_replicas})"
            v.add(f"{p}.max_replicas", f"must be ≥ {bound}")
        else:
            v.at_most(f"{p}.max_replicas", s.max_replicas, LIMITS["replicas"])
    v.non_negative(f"{p}.cpus_per_replica", s.cpus_per_replica, LIMITS["cpus"])
    v.non_negative(f"{p}.memory_gib_per_replica", s.memory_gib_per_replica, LIMITS["memory_gib"])


def _check_current(
    problem: Problem, types: set[str], nodes: set[str], workloads: set[str], v: _Collector
) -> None:
    seen: dict[str, str] = {}
    for i, c in enumerate(problem.current):
        p = f"current[{i}]"
        if not c.workload_id:
            v.add(f"{p}.workload_id", "must not be empty")
        elif c.workload_id not in workloads:
            v.add(f"{p}.workload_id", f'unknown workload "{c.workload_id}"')
        elif c.workload_id in seen:
            v.add(f"{p}.workload_id", f'duplicate workload "{c.workload_id}" (also {seen[c.workload_id]})')
        else:
            seen[c.workload_id] = p
        if c.gpu_type and c.gpu_type not in types:
            v.add(f"{p}.gpu_type", f'unknown GPU type "{c.gpu_type}"')
        if not c.shards:
            v.add(f"{p}.shards", "must not be empty")
        for k, shard in enumerate(c.shards):
            sp = f"{p}.shards[{k}]"
            if shard.node_id not in nodes:
                v.add(f"{sp}.node_id", f'unknown node "{shard.node_id}"')
            v.at_least(f"{sp}.gpus", shard.gpus, 1, LIMITS["node_gpus"])


def _check_pinned_quotas(problem: Problem, v: _Collector) -> None:
    """Non-preemptible jobs that run now on live nodes must stay; if together they
    hold more than their tenant's quota, the input contradicts itself (the quota
    was lowered under them): report it rather than plan around it."""
    workloads = {w.id: w for w in problem.workloads}
    nodes = {n.id: n for n in problem.nodes}
    tenants = {t.name: t for t in problem.tenants}
    total: dict[str, int] = {}
    typed: dict[tuple[str, str], int] = {}
    where: dict[str, str] = {}
    for i, c in enumerate(problem.current):
        w = workloads.get(c.workload_id)
        if w is None or w.training is None or w.training.preemptible or w.tenant not in tenants:
            continue
        hosts = [nodes.get(s.node_id) for s in c.shards]
        if not hosts or any(h is None or h.state is not NodeState.READY for h in hosts):
            continue
        for s, h in zip(c.shards, hosts, strict=True):
            assert h is not None
            total[w.tenant] = total.get(w.tenant, 0) + s.gpus
            typed[w.tenant, h.gpu_type] = typed.get((w.tenant, h.gpu_type), 0) + s.gpus
        where.setdefault(w.tenant, f"current[{i}]")
    for name, used in sorted(total.items()):
        t = tenants[name]
        if t.max_gpus is not None and used > t.max_gpus:
            v.add(
                where[name],
                f'non-preemptible running jobs of tenant "{name}" hold {used} GPUs, over its '
                f"max_gpus {t.max_gpus}: they can neither stay nor move",
            )
    for (name, gpu_type), used in sorted(typed.items()):
        cap = tenants[name].max_gpus_per_type.get(gpu_type)
        if cap is not None and used > cap:
            v.add(
                where[name],
                f'non-preemptible running jobs of tenant "{name}" hold {used} {gpu_type} GPUs, '
                f"over its quota of {cap}: they can neither stay nor move",
            )
