"""Concrete candidate plans from a solution of the aggregated model.

A solution of the aggregated model counts how many members of each class run
each way; only a plan on the nodes can replace the search's incumbent. Each
function here packs counts on the nodes (``solver.disaggregate``) and completes
what is left greedily (``solver.greedy``) in its own order, and returns the
plan with its variable values (``Formulation.hint``), for the search to compare
on the policy's stages.
"""

from __future__ import annotations

from collections.abc import Mapping

from solver.aggregate import Index
from solver.disaggregate import disaggregate
from solver.formulation import Formulation
from solver.greedy import complete, repair_priority
from solver.model import Placement

__all__ = ["Candidate", "Packer"]

#: A concrete plan and its variable values.
Candidate = tuple[dict[str, Placement], dict[int, float]]


class Packer:
    """Packs counts of ``form``'s model into concrete plans, completing greedily
    with the policy's preference (``prefer``)."""

    def __init__(self, form: Formulation, prefer: str, max_migrations: int | None) -> None:
        self.form = form
        self.index: Index = form.index
        self.prefer = prefer
        self.max_migrations = max_migrations
        # What one more GPU of each type is worth (the primary LP's shadow prices),
        # once known: services completed greedily go where it is least.
        self.gpu_value: Mapping[str, float] | None = None

    def concrete(
        self, counts: Mapping[tuple[int, int], int], preplaced: Mapping[str, Placement] | None = None
    ) -> Candidate:
        """The counts packed on nodes and completed greedily."""
        partial, _ = disaggregate(self.index, counts, preplaced)
        full = complete(self.index, partial, self.prefer, gpu_value=self.gpu_value)
        return full, self.form.hint(full.values())

    def tiered(self, counts: Mapping[tuple[int, int], int], keep: Mapping[str, Placement]) -> Candidate:
        """Like :meth:`concrete`, one priority tier at a time, highest first: each
        tier's counts are packed and then completed greedily before the next tier is
        packed, so a lower tier never takes the room a higher tier's job lost in
        rounding or packing (the LP may trade a tier's jobs for fractional service
        coverage). Non-preemptible running jobs of every tier stay where they run
        first (else a higher tier's gang could take their node: found by Hypothesis)."""
        index = self.index
        placed = dict(keep)
        pinned = {key: n for key, n in counts.items() if index.classes[key[0]].pinned}
        if pinned:
            placed, _ = disaggregate(index, pinned, placed)
        # Then every tier's jobs that the counts keep where they run: a higher tier's
        # gang packed first could take their node, and a job moved to another node of
        # the same shape is a migration the aggregated model does not see (found by
        # Hypothesis: two migrations under max_migrations 1).
        staying = {key: n for key, n in counts.items() if index.classes[key[0]].current_option == key[1]}
        if staying:
            placed, _ = disaggregate(index, staying, placed)
        for tier in index.tiers:
            part = {key: n for key, n in counts.items() if index.classes[key[0]].tier == tier}
            placed, _ = disaggregate(index, part, placed)
            placed = complete(index, placed, self.prefer, tier=tier, gpu_value=self.gpu_value)
        return placed, self.form.hint(placed.values())

    def restored(self, counts: Mapping[tuple[int, int], int], keep: Mapping[str, Placement]) -> Candidate:
        """Like :meth:`concrete`, then strict priority restored on the nodes: a higher
        tier's job that rounding or packing left out (the LP may trade a tier's jobs
        for fractional service coverage under the same floor) takes the room of
        lower-priority work, which is placed again where it fits; repeated while that
        changes the plan (a middle tier's evicted job gets its turn), at most 3 times."""
        index = self.index
        partial, _ = disaggregate(index, counts, keep)
        full = complete(index, partial, self.prefer, gpu_value=self.gpu_value)
        for _ in range(3):
            repaired = repair_priority(index, full, self.max_migrations)
            again = complete(index, repaired, self.prefer, gpu_value=self.gpu_value)
            if again == full:
                break
            full = again
        return full, self.form.hint(full.values())

    def refilled(self, incumbent: Mapping[str, Placement], tier: int) -> Candidate:
        """``incumbent`` with ``tier``'s and lower tiers' jobs that do not run now
        placed again, smallest first (services, higher tiers and running work stay)."""
        index = self.index
        keep = {
            wid: p
            for wid, p in incumbent.items()
            if index.workloads[wid].priority > tier
            or index.workloads[wid].inference is not None
            or wid in index.current
        }
        again = complete(index, keep, self.prefer, order_name="smallest-first")
        return again, self.form.hint(again.values())
