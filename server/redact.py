"""Other tenants' workload ids are not shown to a tenant.

The planner explains with ids ("held by higher-priority workloads: b-job"), and those
texts reach a tenant in its workloads' status messages and reasons, in ``Explain``,
``GetPlan`` and ``Watch``. For a tenant caller, every word of those texts that is the
id of another tenant's workload becomes :data:`FOREIGN`; the admin sees them as they
are. Words are runs of the name grammar's characters (``solver.validate.NAME_RULE``),
so an id is found whole wherever it stands; the owners of all the words of one answer
are looked up in one query.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

if TYPE_CHECKING:
    from server.store import Store

__all__ = ["FOREIGN", "redact"]

M = TypeVar("M", bound=Message)

FOREIGN = "another tenant's workload"
TEXT_FIELDS = frozenset({"message", "summary", "details", "reasons", "text"})
_WORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def _texts(msg: Message) -> Iterator[tuple[Message, FieldDescriptor]]:
    """The string fields named in :data:`TEXT_FIELDS` of ``msg`` and its sub-messages."""
    for field, value in msg.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING and field.name in TEXT_FIELDS:
            yield msg, field
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            items = value if field.is_repeated else [value]
            for item in items:
                yield from _texts(item)


def redact(msg: M, tenant: str, store: Store) -> M:
    """``msg`` (changed in place, and returned) with every other tenant's workload id in
    its texts replaced by :data:`FOREIGN`."""
    fields = list(_texts(msg))
    words: set[str] = set()
    for owner, field in fields:
        value = getattr(owner, field.name)
        for text in value if field.is_repeated else [value]:
            words.update(_WORD.findall(text))
    foreign = {w for w, t in store.tenants_of(words).items() if t != tenant} if words else set()
    if not foreign:
        return msg

    def clean(text: str) -> str:
        return _WORD.sub(lambda m: FOREIGN if m.group() in foreign else m.group(), text)

    for owner, field in fields:
        if field.is_repeated:
            values = getattr(owner, field.name)
            values[:] = [clean(v) for v in values]
        else:
            setattr(owner, field.name, clean(getattr(owner, field.name)))
    return msg
