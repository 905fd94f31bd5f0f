"""A plan meets the admissions made while it was being solved.

The admission (``server.admission``) places new work into free capacity at
once, while the control loop's round solves a snapshot taken before. When that
plan is applied (``Store.apply_plan``), the rows admitted since its snapshot
keep their admission (whatever the plan said of them: it saw them pending, or
not at all), and the plan's own placements are checked against them where they
meet: on the nodes the admitted rows hold and in their tenants' quotas.

Where the two together overflow a node or a quota, the lowest priority gives
way first, one workload at a time until it fits: an admitted workload is
withdrawn (back to PENDING, for the next round), a plan's placement of a
workload that held nothing is not applied (it stays PENDING). At equal priority
the plan's placement gives way (the admitted one may have started already).
A plan's moves of running work are never undone: only those two kinds give way,
and without them the plan fitted by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.usage import Usage, Use, node_fits, over_quota

__all__ = ["Claim", "settle"]


@dataclass(frozen=True)
class Claim:
    """One workload's hold on capacity: an admission, or a plan's new placement."""

    id: str
    priority: int
    tenant: str
    gpu_type: str
    held: Mapping[str, Use]
    admitted: bool  # True: an admission; False: a plan's placement of a workload that held nothing


def settle(
    usage: Usage,
    claims: list[Claim],
    nodes: Mapping[str, Mapping[str, Any]],
    tenants: Mapping[str, Mapping[str, Any]],
) -> set[str]:
    """The ids of the claims that give way. ``usage`` is everything the plan and
    the admissions hold together (claims included); it is updated as claims give way."""
    gone: set[str] = set()

    def give_way(candidates: list[Claim], fits: Any) -> None:
        # lowest priority first; at equal priority the plan's placement before the admission
        for c in sorted(candidates, key=lambda c: (c.priority, c.admitted, c.id)):
            if fits():
                return
            if c.id in gone:
                continue
            gone.add(c.id)
            usage.add(c.tenant, c.gpu_type, c.held, sign=-1.0)

    touched = sorted({n for c in claims if c.admitted for n in c.held})
    for node_id in touched:
        node = nodes.get(node_id)
        if node is None:
            continue
        on_node = [c for c in claims if node_id in c.held]
        give_way(on_node, lambda node=node, node_id=node_id: node_fits(node, usage.node(node_id)))
    for tenant in sorted({c.tenant for c in claims if c.admitted}):
        doc = tenants.get(tenant)
        of_tenant = [c for c in claims if c.tenant == tenant]
        give_way(of_tenant, lambda doc=doc, tenant=tenant: not over_quota(doc, usage.tenants.get(tenant, {})))
    return gone
