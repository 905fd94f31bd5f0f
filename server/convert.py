"""Files ⇄ protobuf messages ⇄ the solver's domain.

This is the one module that sees both the generated ``apportion.v1`` messages
and the solver's dataclasses; servicers and the CLI call it and nothing else
converts.

Files are the canonical proto3 JSON mapping of ``apportion.v1`` messages, in
YAML or JSON (told apart by content): an inventory file is an ``Inventory``, a
workloads file a ``WorkloadList``, a plan file (the ``--current`` input, or a
plan printed with ``--format json``) a ``Plan``. Field names are snake_case
(the lowerCamelCase JSON names are accepted too, as json_format does).

Errors. ``json_format.ParseDict`` stops at the first problem and its messages
do not name a path, so documents are first walked against the message
descriptors here, collecting *every* structural problem with its path:
unknown field, wrong type, both members of a oneof. Then the message is built
and converted to domain objects, which reports the few rules needed to build
them: enum-like strings (``state``, ``locality``, ``spread``) and a training
spec that gives both ``gpus`` and ``elastic``. Everything else (unknown GPU
type, duplicate ids, negative counts, empty ids...) is ``solver.validate``'s
job, in the same path scheme. When a document has structural problems, the
domain objects that could still be built are validated too and the semantic
violations that do not sit on an already reported field are added, so one run
lists everything. All of it is raised as one :class:`solver.ValidationError`.

Paths are relative to the file root (``nodes[3].gpus``,
``workloads[1].inference.target_rps``), map entries are written
``labels["tier"]``, and the placements of a ``--current`` plan are reported as
``current[i]`` — the scheme of ``solver.validate``, which sees them as
``Problem.current``. Problems with a whole file (unreadable, not YAML, not a
mapping) have an empty path and name the file in the message.

Decisions (DESIGN.md is silent on them):

* YAML is read with ``yaml.safe_load`` semantics plus two fixes: a duplicate key
  is an error (PyYAML silently keeps the last one), and ``1e5`` is a number as
  in YAML 1.2 and JSON (PyYAML's YAML 1.1 reads it as a string). A document that
  looks like JSON is parsed as JSON first.
* ``null`` means absent, as in proto JSON. An empty file is an empty message.
* Integers must be numbers: ``8`` or ``8.0``, not ``"8"``. Strings must be
  strings: YAML reads ``zone: 1`` or ``tier: yes`` as a number or a boolean, and
  the error says to quote it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

import solver
from apportion.v1 import allocator_pb2 as apb
from apportion.v1 import types_pb2 as pb
from solver import (
    GangShape,
    GpuType,
    InferenceSpec,
    Locality,
    Node,
    NodeState,
    Placement,
    Plan,
    PlanMetrics,
    PlanOptions,
    PlanStatus,
    Problem,
    Reason,
    ReasonCode,
    Shard,
    Shortfall,
    Spread,
    Tenant,
    TrainingSpec,
    Unplaced,
    ValidationError,
    Violation,
    Workload,
)
from solver.backends import BACKENDS

__all__ = [
    "check_document",
    "inventory_from_data",
    "load_document",
    "load_plan_message",
    "load_problem",
    "message_to_dict",
    "plan_from_data",
    "plan_from_message",
    "plan_to_dict",
    "plan_to_message",
    "problem_from_messages",
    "workloads_from_data",
]

M = TypeVar("M", bound=Message)

# ---------------------------------------------------------------------------
# Reading files


_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's C parser


class _Loader(_Base):  # type: ignore[valid-type, misc]
    """safe_load, plus duplicate-key detection and YAML 1.2 floats like ``1e5``. Parsed by
    libyaml's C parser where PyYAML has it (``yaml.CSafeLoader``: 10,000 training
    workloads in 1.8 s instead of 7.0 s, measured on the 2-core VM while a benchmark ran),
    else the pure-Python one; the same documents either way."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if duplicate:
            mark = key_node.start_mark
            loader.duplicates.append(
                f"line {mark.line + 1}, column {mark.column + 1}: duplicate key {_describe(key)}"
            )
    return cast(dict[Any, Any], loader.construct_mapping(node, deep=True))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_INPUT_ENV = "APPORTION_MAX_INPUT_MIB"
DEFAULT_MAX_INPUT_MIB = 32.0
"""Input files larger than this (MiB; ``$APPORTION_MAX_INPUT_MIB`` overrides) are refused
before they are read: a 50 MB junk file once took 64 s and 2.2 GB to reject."""


def max_input_bytes() -> int:
    """The input size cap in bytes (:data:`DEFAULT_MAX_INPUT_MIB`, or the environment's)."""
    raw = os.environ.get(MAX_INPUT_ENV, "")
    try:
        mib = float(raw) if raw else DEFAULT_MAX_INPUT_MIB
    except ValueError:
        mib = DEFAULT_MAX_INPUT_MIB
    if not (mib > 0 and math.isfinite(mib)):
        mib = DEFAULT_MAX_INPUT_MIB
    return int(mib * 1024 * 1024)


def load_document(path: str | Path) -> Any:
    """Read a YAML or JSON file into plain Python data: a regular file (not a FIFO, which
    would hang, nor a device such as /dev/zero) of at most :func:`max_input_bytes`.

    Raises:
        ValidationError: the file cannot be read or is not well-formed YAML/JSON.
    """
    limit = max_input_bytes()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without a writer, then is refused
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValidationError([Violation("", f"cannot read {path}: not a regular file")])
            if info.st_size > limit:
                raise ValidationError([Violation("", _too_large(path, limit))])
            raw = f.read(limit + 1)  # a file that grows while it is read is cut here
        if len(raw) > limit:
            raise ValidationError([Violation("", _too_large(path, limit))])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValidationError([Violation("", f"cannot read {path}: {reason}")]) from exc
    return parse_document(text, str(path))


def _too_large(path: str | Path, limit: int) -> str:
    return (
        f"cannot read {path}: larger than the input limit of {limit / 2**20:g} MiB "
        f"(set {MAX_INPUT_ENV} to raise it)"
    )


def parse_document(text: str, source: str = "<input>") -> Any:
    """Parse YAML or JSON text (see :func:`load_document`)."""
    if text.lstrip().startswith(("{", "[")):
        duplicates: list[str] = []

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in items]
            duplicates.extend(
                f"duplicate key {_describe(k)}" for k in sorted({k for k in keys if keys.count(k) > 1})
            )
            return dict(items)

        try:
            data = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError:
            pass  # flow-style YAML also starts with "{": let YAML try
        except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of 4,300+ digits
            raise ValidationError(
                [Violation("", f"{source}: cannot be read: {_limit_message(exc)}")]
            ) from None
        else:
            if duplicates:
                raise ValidationError([Violation("", f"{source}: {d}") for d in duplicates])
            return data
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ValidationError(
            [Violation("", f"{source}: not valid YAML or JSON: {_yaml_message(exc)}")]
        ) from exc
    except (RecursionError, ValueError) as exc:
        raise ValidationError([Violation("", f"{source}: cannot be read: {_limit_message(exc)}")]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ValidationError([Violation("", f"{source}: {d}") for d in loader.duplicates])
    return data


def _limit_message(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        return f"{where}: {what}"
    return str(exc)


# ---------------------------------------------------------------------------
# Structural checks: plain data against the message descriptors


def check_document(
    data: Any, descriptor: Descriptor, *, source: str = ""
) -> tuple[dict[str, Any], list[Violation]]:
    """Walk ``data`` against ``descriptor``; return a cleaned copy and the problems.

    The copy keeps what is well-formed: a bad scalar is left out (so its field
    has its default), a bad message (also inside a list) becomes ``{}`` so list
    indices stay those of the file. The copy always parses with json_format.
    """
    out: list[Violation] = []
    if data is None:
        return {}, out
    if not isinstance(data, Mapping):
        keys = ", ".join(f.name for f in descriptor.fields)
        where = f"{source}: " if source else ""
        out.append(Violation("", f"{where}expected a mapping with {keys}; got {_describe(data)}"))
        return {}, out
    return _walk_message(data, descriptor, "", out), out


_INT32 = (-(2**31), 2**31 - 1)
_CPP = FieldDescriptor


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walk_message(
    data: Mapping[Any, Any], desc: Descriptor, path: str, out: list[Violation]
) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    by_json = {f.json_name: f for f in desc.fields}
    oneof_seen: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            out.append(Violation(path, f"field names must be strings, got {_describe(key)}"))
            continue
        field = desc.fields_by_name.get(key) or by_json.get(key)
        if field is None:
            out.append(Violation(_join(path, key), _unknown_field(key, desc)))
            continue
        fpath = _join(path, field.name)
        if field.name in clean:
            out.append(Violation(fpath, f'given twice (as "{field.name}" and "{field.json_name}")'))
            continue
        if value is None:
            continue
        oneof = field.containing_oneof
        if oneof is not None and not _synthetic(oneof.name, field):
            other = oneof_seen.get(oneof.name)
            if other is not None:
                out.append(Violation(path, f"give either {other} or {field.name}, not both"))
                continue
            oneof_seen[oneof.name] = field.name
        ok, cleaned = _walk_field(value, field, fpath, out)
        if ok:
            clean[field.name] = cleaned
    return clean


def _message_type(field: FieldDescriptor) -> Descriptor:
    desc = field.message_type
    assert desc is not None, field.full_name
    return desc


def _descriptor(message: Message) -> Descriptor:
    return cast(Descriptor, message.DESCRIPTOR)


def _synthetic(oneof_name: str, field: FieldDescriptor) -> bool:
    """proto3 ``optional`` fields sit in a one-member oneof named ``_<field>``."""
    return oneof_name == f"_{field.name}"


def _walk_field(value: Any, field: FieldDescriptor, path: str, out: list[Violation]) -> tuple[bool, Any]:
    if _is_map(field):
        if not isinstance(value, Mapping):
            out.append(Violation(path, f"expected a mapping, got {_describe(value)}"))
            return False, None
        value_field = _message_type(field).fields_by_name["value"]
        entries: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                out.append(Violation(path, f"keys must be strings, got {_describe(k)} (quote it)"))
                continue
            ok, cleaned = _walk_single(v, value_field, f'{path}["{k}"]', out)
            if ok:
                entries[k] = cleaned
        return True, entries
    if field.is_repeated:
        if not isinstance(value, list):
            out.append(Violation(path, f"expected a list, got {_describe(value)}"))
            return False, None
        items: list[Any] = []
        for i, item in enumerate(value):
            ok, cleaned = _walk_single(item, field, f"{path}[{i}]", out)
            if ok:
                items.append(cleaned)
            elif field.type == _CPP.TYPE_MESSAGE:
                items.append({})  # keep the indices of the file
        return True, items
    return _walk_single(value, field, path, out)


def _walk_single(value: Any, field: FieldDescriptor, path: str, out: list[Violation]) -> tuple[bool, Any]:
    """One value of ``field``'s type (a message or a scalar, not a list or map)."""
    cpp = field.cpp_type
    if cpp == _CPP.CPPTYPE_MESSAGE:
        if not isinstance(value, Mapping):
            out.append(Violation(path, f"expected a mapping, got {_describe(value)}"))
            # A bad singular message stays set (as {}) so that a oneof keeps its member and the
            # fields inside it are not reported again as missing; a bad list item is kept as {}
            # by the caller so that indices stay those of the file.
            return not field.is_repeated, {}
        return True, _walk_message(value, _message_type(field), path, out)
    if value is None:
        out.append(Violation(path, "expected a value, got null"))
        return False, None
    if cpp in (_CPP.CPPTYPE_INT32, _CPP.CPPTYPE_INT64, _CPP.CPPTYPE_UINT32, _CPP.CPPTYPE_UINT64):
        number = _as_int(value)
        if number is None:
            out.append(Violation(path, f"expected an integer, got {_describe(value)}"))
            return False, None
        if cpp == _CPP.CPPTYPE_INT32 and not _INT32[0] <= number <= _INT32[1]:
            out.append(Violation(path, f"{number} is out of range (a 32-bit integer)"))
            return False, None
        return True, number
    if cpp in (_CPP.CPPTYPE_DOUBLE, _CPP.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float):
            out.append(Violation(path, f"expected a number, got {_describe(value)}"))
            return False, None
        return True, float(value)
    if cpp == _CPP.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            out.append(Violation(path, f"expected true or false, got {_describe(value)}"))
            return False, None
        return True, value
    if cpp == _CPP.CPPTYPE_STRING:
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float | bool) else ""
            out.append(Violation(path, f"expected a string, got {_describe(value)}{hint}"))
            return False, None
        return True, value
    out.append(Violation(path, f"unsupported field type {cpp}"))  # pragma: no cover - not in our schema
    return False, None


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == _CPP.TYPE_MESSAGE and field.is_repeated and _message_type(field).GetOptions().map_entry
    )


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool | str) or value is None:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    return f"{str(value)!r} ({type(value).__name__})"


def _unknown_field(key: str, desc: Descriptor) -> str:
    names = [f.name for f in desc.fields]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f'unknown field (did you mean "{close[0]}"?)'
    return f"unknown field (expected one of {', '.join(names)})"


def _parse(data: Any, message: M, source: str) -> tuple[M, list[Violation]]:
    clean, violations = check_document(data, _descriptor(message), source=source)
    try:
        json_format.ParseDict(clean, message)
    except json_format.ParseError as exc:  # the walk should have caught it; never hide it
        violations.append(Violation("", f"{source or 'input'}: {exc}"))
    return message, violations


def _raise_if(violations: list[Violation]) -> None:
    if violations:
        raise ValidationError(violations)


def inventory_from_data(data: Any, *, source: str = "") -> pb.Inventory:
    """An inventory document as a message; raises ValidationError with every structural problem."""
    msg, violations = _parse(data, pb.Inventory(), source)
    _raise_if(violations)
    return msg


def workloads_from_data(data: Any, *, source: str = "") -> pb.WorkloadList:
    """A workloads document as a message; raises ValidationError with every structural problem."""
    msg, violations = _parse(data, pb.WorkloadList(), source)
    _raise_if(violations)
    return msg


def plan_from_data(data: Any, *, source: str = "") -> pb.Plan:
    """A plan document as a message; raises ValidationError with every structural problem."""
    msg, violations = _parse(data, pb.Plan(), source)
    _raise_if(violations)
    return msg


def load_plan_message(path: str | Path) -> pb.Plan:
    """Read a plan file (as printed by ``apportion plan --format json``)."""
    return plan_from_data(load_document(path), source=str(path))


# ---------------------------------------------------------------------------
# Messages -> domain


_E = TypeVar("_E", NodeState, Locality, Spread, PlanStatus, ReasonCode)


def _enum(kind: type[_E], value: str, default: _E | None, path: str, out: list[Violation]) -> _E:
    """The member of ``kind`` named by ``value`` (its default when empty)."""
    if not value and default is not None:
        return default
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        out.append(Violation(path, f"must be one of {allowed}; got {json.dumps(value)}"))
        return default if default is not None else next(iter(kind))


def _gpu_type(msg: pb.GpuType) -> GpuType:
    return GpuType(
        name=msg.name,
        memory_gib=msg.memory_gib,
        cost_per_hour=msg.cost_per_hour if msg.HasField("cost_per_hour") else None,
    )


def _node(msg: pb.Node, path: str, out: list[Violation]) -> Node:
    return Node(
        id=msg.id,
        gpu_type=msg.gpu_type,
        gpus=msg.gpus,
        cpus=msg.cpus,
        memory_gib=msg.memory_gib,
        zone=msg.zone,
        domain=msg.domain,
        labels=dict(msg.labels),
        state=_enum(NodeState, msg.state, NodeState.READY, f"{path}.state", out),
    )


def _tenant(msg: pb.Tenant) -> Tenant:
    return Tenant(
        name=msg.name,
        max_gpus=msg.max_gpus if msg.HasField("max_gpus") else None,
        max_gpus_per_type=dict(msg.max_gpus_per_type),
        weight=msg.weight if msg.HasField("weight") else 1.0,
    )


def _training(msg: pb.TrainingSpec, path: str, out: list[Violation]) -> TrainingSpec:
    shapes: tuple[GangShape, ...]
    if msg.elastic:
        if msg.HasField("gpus"):
            out.append(
                Violation(
                    f"{path}.gpus", "give either gpus (a fixed gang) or elastic (several sizes), not both"
                )
            )
        if msg.throughput:
            out.append(
                Violation(f"{path}.throughput", "with elastic, give the throughput inside each elastic entry")
            )
        shapes = tuple(GangShape(gpus=e.gpus, throughput=dict(e.throughput)) for e in msg.elastic)
    elif msg.HasField("gpus"):
        shapes = (GangShape(gpus=msg.gpus, throughput=dict(msg.throughput)),)
    else:
        shapes = ()  # solver.validate reports the missing gpus
    return TrainingSpec(
        shapes=shapes,
        gpu_memory_gib=msg.gpu_memory_gib,
        cpus_per_gpu=msg.cpus_per_gpu,
        memory_gib_per_gpu=msg.memory_gib_per_gpu,
        locality=_enum(Locality, msg.locality, Locality.ANY, f"{path}.locality", out),
        remaining_work=msg.remaining_work if msg.HasField("remaining_work") else None,
        deadline_s=msg.deadline_s if msg.HasField("deadline_s") else None,
        preemptible=msg.preemptible if msg.HasField("preemptible") else True,
    )


def _inference(msg: pb.InferenceSpec, path: str, out: list[Violation]) -> InferenceSpec:
    return InferenceSpec(
        gpus_per_replica=dict(msg.gpus_per_replica),
        replica_rps=dict(msg.replica_rps),
        target_rps=msg.target_rps,
        min_replicas=msg.min_replicas if msg.HasField("min_replicas") else 1,
        max_replicas=msg.max_replicas if msg.HasField("max_replicas") else None,
        cpus_per_replica=msg.cpus_per_replica,
        memory_gib_per_replica=msg.memory_gib_per_replica,
        spread=_enum(Spread, msg.spread, Spread.NONE, f"{path}.spread", out),
    )


def _workload(msg: pb.Workload, path: str, out: list[Violation]) -> Workload:
    kind = msg.WhichOneof("spec")
    return Workload(
        id=msg.id,
        tenant=msg.tenant,
        priority=msg.priority,
        weight=msg.weight if msg.HasField("weight") else 1.0,
        allowed_gpu_types=tuple(msg.allowed_gpu_types),
        node_selector=dict(msg.node_selector),
        submit_time_s=msg.submit_time_s,
        training=_training(msg.training, f"{path}.training", out) if kind == "training" else None,
        inference=_inference(msg.inference, f"{path}.inference", out) if kind == "inference" else None,
    )


def _placement(msg: pb.Placement) -> Placement:
    return Placement(
        workload_id=msg.workload_id,
        shards=tuple(Shard(node_id=s.node_id, gpus=s.gpus) for s in msg.shards),
        gpu_type=msg.gpu_type,
    )


def _build_problem(
    inventory: pb.Inventory, workloads: pb.WorkloadList, current: pb.Plan | None, out: list[Violation]
) -> Problem:
    return Problem(
        gpu_types=tuple(_gpu_type(t) for t in inventory.gpu_types),
        nodes=tuple(_node(n, f"nodes[{i}]", out) for i, n in enumerate(inventory.nodes)),
        tenants=tuple(_tenant(t) for t in inventory.tenants),
        workloads=tuple(_workload(w, f"workloads[{i}]", out) for i, w in enumerate(workloads.workloads)),
        current=tuple(_placement(p) for p in current.placements) if current is not None else (),
    )


def problem_from_messages(
    inventory: pb.Inventory, workloads: pb.WorkloadList, current: pb.Plan | None = None
) -> Problem:
    """The domain problem of these messages (only ``current.placements`` is read).

    Raises:
        ValidationError: an enum-like string is not one of its values, or a
            training spec gives both ``gpus`` and ``elastic``. Semantic rules are
            ``solver.validate``'s (``solver.plan`` runs it).
    """
    out: list[Violation] = []
    problem = _build_problem(inventory, workloads, current, out)
    _raise_if(out)
    return problem


def domain_of(
    *,
    gpu_types: Iterable[Mapping[str, Any]] = (),
    nodes: Iterable[Mapping[str, Any]] = (),
    tenants: Iterable[Mapping[str, Any]] = (),
    workloads: Iterable[Mapping[str, Any]] = (),
) -> Problem:
    """Stored dicts as domain objects, each part converted alone (the admission keeps
    them between calls and puts problems together of its own); not validated.

    Raises:
        ValidationError: as :func:`problem_from_messages`.
    """
    out: list[Violation] = []
    problem = Problem(
        gpu_types=tuple(_gpu_type(gpu_type_from_dict(t)) for t in gpu_types),
        nodes=tuple(_node(node_from_dict(n), f"nodes[{i}]", out) for i, n in enumerate(nodes)),
        tenants=tuple(_tenant(tenant_from_dict(t)) for t in tenants),
        workloads=tuple(
            _workload(workload_from_dict(w), f"workloads[{i}]", out) for i, w in enumerate(workloads)
        ),
    )
    _raise_if(out)
    return problem


def load_problem(
    inventory_path: str | Path, workloads_path: str | Path, current_path: str | Path | None = None
) -> Problem:
    """Read the input files of a plan into a :class:`solver.Problem`.

    Raises:
        ValidationError: listing every problem in all the files together (see
            the module docstring). A problem that loads is not yet validated:
            ``solver.plan`` does that.
    """
    violations: list[Violation] = []
    all_read = True

    def read(path: str | Path, message: M, prefix: Callable[[str], str]) -> M:
        nonlocal all_read
        try:
            data = load_document(path)
        except ValidationError as exc:
            violations.extend(exc.violations)
            all_read = False
            return message
        msg, found = _parse(data, message, str(path))
        violations.extend(Violation(prefix(v.path), v.message) for v in found)
        return msg

    inventory = read(inventory_path, pb.Inventory(), _same)
    workloads = read(workloads_path, pb.WorkloadList(), _same)
    current = read(current_path, pb.Plan(), _current_path) if current_path is not None else None
    structural = list(violations)
    built: list[Violation] = []
    problem = _build_problem(inventory, workloads, current, built)
    violations.extend(built)
    if not violations:
        return problem
    if all_read:
        violations.extend(_semantic_extra(problem, structural + built))
    raise ValidationError(_in_file_order(violations))


def _same(path: str) -> str:
    return path


def _current_path(path: str) -> str:
    """``placements[i]...`` of a --current plan file is ``current[i]...`` (Problem.current)."""
    if path.startswith("placements["):
        return "current" + path[len("placements") :]
    return _join("current", path) if path else path


def _semantic_extra(problem: Problem, reported: list[Violation]) -> list[Violation]:
    """solver.validate's violations that are not about a field already reported."""
    try:
        solver.validate(problem)
    except ValidationError as exc:
        bad = [v.path for v in reported if v.path]
        return [v for v in exc.violations if not any(_within(v.path, b) for b in bad)]
    return []


def _within(path: str, outer: str) -> bool:
    return path == outer or path.startswith((f"{outer}.", f"{outer}["))


_SECTIONS = {"gpu_types": 0, "nodes": 1, "tenants": 2, "workloads": 3, "current": 4}
_HEAD = re.compile(r"^(\w+)(?:\[(\d+)\])?")


def _in_file_order(violations: Iterable[Violation]) -> list[Violation]:
    """Grouped by file section and entry, keeping the order of discovery inside one entry."""

    def key(v: Violation) -> tuple[int, int]:
        match = _HEAD.match(v.path)
        if match is None:
            return (-1, -1)
        section = _SECTIONS.get(match.group(1), len(_SECTIONS))
        return (section, int(match.group(2)) if match.group(2) else -1)

    return sorted(violations, key=key)


def plan_from_message(msg: pb.Plan) -> Plan:
    """A plan message (e.g. a plan file) as a :class:`solver.Plan`.

    Raises:
        ValidationError: the status or a reason code is not a known one.
    """
    out: list[Violation] = []

    def reasons(details: Iterable[pb.Reason], path: str) -> tuple[Reason, ...]:
        return tuple(
            Reason(code=_enum(ReasonCode, r.code, None, f"{path}.details[{k}].code", out), message=r.message)
            for k, r in enumerate(details)
        )

    m = msg.metrics
    plan = Plan(
        status=_enum(PlanStatus, msg.status, None, "status", out),
        policy=msg.policy,
        objective=msg.objective,
        best_bound=msg.best_bound if msg.HasField("best_bound") else None,
        gap=msg.gap if msg.HasField("gap") else None,
        work_s=msg.work_s,
        stopped_by=msg.stopped_by or "heuristic",
        placements=tuple(_placement(p) for p in msg.placements),
        unplaced=tuple(
            Unplaced(workload_id=u.workload_id, reasons=reasons(u.details, f"unplaced[{i}]"))
            for i, u in enumerate(msg.unplaced)
        ),
        shortfalls=tuple(
            Shortfall(
                workload_id=s.workload_id,
                served_rps=s.served_rps,
                target_rps=s.target_rps,
                reasons=reasons(s.details, f"shortfalls[{i}]"),
            )
            for i, s in enumerate(msg.shortfalls)
        ),
        stage_times_s=dict(msg.stage_times_s),
        shadow_prices=dict(msg.shadow_prices),
        metrics=PlanMetrics(
            gpus_used=m.gpus_used,
            gpus_total=m.gpus_total,
            cost_per_hour=m.cost_per_hour,
            normalized_throughput=m.normalized_throughput,
            served_fraction=m.served_fraction,
            migrations=m.migrations,
            placed=m.placed,
            unplaced=m.unplaced,
        ),
    )
    _raise_if(out)
    return plan


# ---------------------------------------------------------------------------
# Domain -> messages -> JSON


def _reason_messages(reasons: Iterable[Reason]) -> tuple[list[str], list[pb.Reason]]:
    reasons = tuple(reasons)
    return [r.message for r in reasons], [pb.Reason(code=r.code.value, message=r.message) for r in reasons]


def placement_to_message(p: Placement) -> pb.Placement:
    return pb.Placement(
        workload_id=p.workload_id,
        gpu_type=p.gpu_type,
        shards=[pb.Shard(node_id=s.node_id, gpus=s.gpus) for s in p.shards],
    )


def plan_to_message(plan: Plan) -> pb.Plan:
    """A :class:`solver.Plan` as an ``apportion.v1.Plan``."""
    msg = pb.Plan(
        status=plan.status.value,
        policy=plan.policy,
        objective=plan.objective,
        placements=[placement_to_message(p) for p in plan.placements],
        stage_times_s=dict(plan.stage_times_s),
        shadow_prices=dict(plan.shadow_prices),
        work_s=plan.work_s,
        stopped_by=plan.stopped_by,
        metrics=pb.PlanMetrics(
            gpus_used=plan.metrics.gpus_used,
            gpus_total=plan.metrics.gpus_total,
            cost_per_hour=plan.metrics.cost_per_hour,
            normalized_throughput=plan.metrics.normalized_throughput,
            served_fraction=plan.metrics.served_fraction,
            migrations=plan.metrics.migrations,
            placed=plan.metrics.placed,
            unplaced=plan.metrics.unplaced,
        ),
    )
    if plan.best_bound is not None:
        msg.best_bound = plan.best_bound
    if plan.gap is not None:
        msg.gap = plan.gap
    for u in plan.unplaced:
        texts, details = _reason_messages(u.reasons)
        msg.unplaced.append(pb.Unplaced(workload_id=u.workload_id, reasons=texts, details=details))
    for s in plan.shortfalls:
        texts, details = _reason_messages(s.reasons)
        msg.shortfalls.append(
            pb.Shortfall(
                workload_id=s.workload_id,
                served_rps=s.served_rps,
                target_rps=s.target_rps,
                reasons=texts,
                details=details,
            )
        )
    return msg


def message_to_dict(msg: Message) -> dict[str, Any]:
    """The canonical JSON mapping of ``msg`` as plain data: snake_case names,
    fields in declaration order, zero numbers and empty lists included (so
    ``"gap": 0.0`` is kept), unset ``optional`` fields left out."""
    data = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _declaration_order(data, _descriptor(msg))


def _declaration_order(data: dict[str, Any], desc: Descriptor) -> dict[str, Any]:
    ordered: dict[str, Any] = {}
    for field in desc.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type == _CPP.TYPE_MESSAGE and not _is_map(field):
            if field.is_repeated:
                value = [_declaration_order(v, _message_type(field)) for v in value]
            else:
                value = _declaration_order(value, _message_type(field))
        elif _is_map(field):
            value = dict(sorted(value.items()))  # proto maps have no order; make the output stable
        ordered[field.name] = value
    return ordered


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """A :class:`solver.Plan` as the plan JSON document (stage times in pipeline order)."""
    data = message_to_dict(plan_to_message(plan))
    times = data["stage_times_s"]
    data["stage_times_s"] = {name: times[name] for name in plan.stage_times_s}
    return data


# ---------------------------------------------------------------------------
# The service: API messages <-> stored state (plain dicts) <-> the domain.
#
# The store keeps every object as the canonical JSON mapping of its message
# (``message_to_dict``), so what it holds reads like the files users write and
# needs no protobuf to load. The functions below are the only bridge between
# those dicts, the API messages (``allocator_pb2``) and the solver's types.


class WorkloadRowLike(Protocol):
    """What :func:`workload_status` reads of a stored workload (``server.store.WorkloadRow``)."""

    @property
    def spec(self) -> dict[str, Any]: ...
    @property
    def state(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def placement(self) -> dict[str, Any] | None: ...
    @property
    def reasons(self) -> list[dict[str, Any]]: ...
    @property
    def message(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def updated_at(self) -> float: ...
    @property
    def revision(self) -> int: ...
    @property
    def observed(self) -> dict[str, Any]: ...


def workload_from_dict(data: Mapping[str, Any]) -> pb.Workload:
    return json_format.ParseDict(dict(data), pb.Workload())


def node_from_dict(data: Mapping[str, Any]) -> pb.Node:
    return json_format.ParseDict(dict(data), pb.Node())


def gpu_type_from_dict(data: Mapping[str, Any]) -> pb.GpuType:
    return json_format.ParseDict(dict(data), pb.GpuType())


def tenant_from_dict(data: Mapping[str, Any]) -> pb.Tenant:
    return json_format.ParseDict(dict(data), pb.Tenant())


def workload_kind(msg: pb.Workload) -> str:
    """``training``, ``inference`` or ``""`` (neither given)."""
    return msg.WhichOneof("spec") or ""


def _rebase(violations: Iterable[Violation], old: str, new: str) -> list[Violation]:
    """Violations with the leading ``old`` of their paths written ``new``."""
    out = []
    for v in violations:
        path = v.path
        if path == old or path.startswith((f"{old}.", f"{old}[")):
            path = new + path[len(old) :]
        out.append(Violation(path, v.message))
    return out


class WorkloadChecker:
    """Checks workloads of requests against one inventory's GPU types and tenants
    (built once, reused for every request while they stay the same)."""

    def __init__(self, gpu_types: Iterable[Mapping[str, Any]], tenants: Iterable[Mapping[str, Any]]) -> None:
        self.gpu_types = [dict(t) for t in gpu_types]
        self.tenants = [dict(t) for t in tenants]
        self._types = tuple(_gpu_type(gpu_type_from_dict(t)) for t in self.gpu_types)
        self._tenants = tuple(_tenant(tenant_from_dict(t)) for t in self.tenants)

    def check(self, msg: pb.Workload, path: str = "workload") -> None:
        """Check one workload with the CLI's rules and messages (paths start at
        ``path``: ``workload.inference.target_rps``).

        Raises:
            ValidationError: every broken rule.
        """
        if not msg.id:
            raise ValidationError([Violation(f"{path}.id", "must not be empty")])
        out: list[Violation] = []
        workload = _workload(msg, "workloads[0]", out)
        problem = Problem(gpu_types=self._types, nodes=(), tenants=self._tenants, workloads=(workload,))
        out += _semantic_extra(problem, out)
        out += check_runtime(msg.runtime, "workloads[0].runtime") if msg.HasField("runtime") else []
        _raise_if(_rebase(_in_file_order(out), "workloads[0]", path))


UNKNOWN_TYPE = 'unknown GPU type "'  # how solver.validate names a GPU type the inventory lacks


MAX_UNKNOWN_TYPES = 16  # a workload naming more GPU types the cluster lacks is refused
NO_KNOWN_TYPE = frozenset(  # solver.validate's messages for a workload with no known type at all
    {
        "needs a positive throughput on at least one known GPU type",
        "needs a known GPU type present in both gpus_per_replica and replica_rps",
    }
)


def unknown_gpu_types(violations: Iterable[Violation]) -> list[str]:
    """The GPU types ``violations`` say are unknown, or [] if any violation is another
    kind (then the workload is invalid, not early) or they are more than
    :data:`MAX_UNKNOWN_TYPES` (a mistake, or a way to fill the store with reasons)."""
    names = set()
    for v in violations:
        if v.message in NO_KNOWN_TYPE:
            continue  # what follows from naming only unknown types
        if not v.message.startswith(UNKNOWN_TYPE):
            return []
        names.add(v.message[len(UNKNOWN_TYPE) :].rstrip('"'))
    return sorted(names) if len(names) <= MAX_UNKNOWN_TYPES else []


def unknown_type_reasons(names: Iterable[str], known: Iterable[str]) -> list[dict[str, Any]]:
    """NO_GPU_TYPE reasons of a workload that names GPU types the server does not know
    yet, each with the closest known name."""
    known = list(known)
    out = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        out.append(
            {
                "code": "NO_GPU_TYPE",
                "message": f'GPU type "{name}" is not in the inventory yet{hint}: '
                "planned with the types it names that are, or once it is added",
            }
        )
    return out


def _type_maps(spec: Mapping[str, Any]) -> list[Any]:
    """The maps of ``spec`` keyed by GPU type (throughputs, replica sizes and rates)."""
    training, inference = spec.get("training"), spec.get("inference")
    maps: list[Any] = []
    if training is not None:
        maps += [training.get("throughput") or {}]
        maps += [e.get("throughput") or {} for e in training.get("elastic", [])]
    if inference is not None:
        maps += [inference.get("gpus_per_replica") or {}, inference.get("replica_rps") or {}]
    return maps


def without_unknown_types(spec: Mapping[str, Any], known: Collection[str]) -> dict[str, Any] | None:
    """``spec`` without what it says of GPU types not in ``known`` (throughputs, replica
    sizes and rates, allowed types); None if no known type is left to run on. A spec
    that names only known types (every spec, on a round's hot path, but the few
    submitted early) is returned as it is, not copied."""
    allowed = spec.get("allowed_gpu_types") or []
    named = {t for m in _type_maps(spec) for t in m} | set(allowed)
    if all(t in known for t in named):
        return dict(spec)
    usable = {t for m in _type_maps(spec) for t in m if t in known}
    if allowed:
        usable &= set(allowed)
    if not usable:
        return None
    out: dict[str, Any] = json.loads(json.dumps(spec))
    for m in _type_maps(out):
        for t in [t for t in m if t not in known]:
            del m[t]
    training = out.get("training")
    if training is not None and training.get("elastic"):
        training["elastic"] = [e for e in training["elastic"] if e.get("throughput")]
    if allowed:
        out["allowed_gpu_types"] = [t for t in allowed if t in known]
    return out


def check_inventory_update(
    request_gpu_types: Sequence[pb.GpuType],
    request_nodes: Sequence[pb.Node],
    request_tenants: Sequence[pb.Tenant],
    *,
    gpu_types: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    tenants: Iterable[Mapping[str, Any]],
) -> None:
    """Check an ``UpsertNodes`` request merged into the stored inventory.

    Paths name the request's fields (``nodes[2].gpu_type``); stored items that
    the request replaces (same name / id) are left out of the check.

    Raises:
        ValidationError: every broken rule.
    """
    new_types = {t.name for t in request_gpu_types}
    new_nodes = {n.id for n in request_nodes}
    new_tenants = {t.name for t in request_tenants}
    inventory = pb.Inventory(
        gpu_types=list(request_gpu_types)
        + [gpu_type_from_dict(t) for t in gpu_types if t.get("name") not in new_types],
        nodes=list(request_nodes) + [node_from_dict(n) for n in nodes if n.get("id") not in new_nodes],
        tenants=list(request_tenants)
        + [tenant_from_dict(t) for t in tenants if t.get("name") not in new_tenants],
    )
    out: list[Violation] = []
    problem = _build_problem(inventory, pb.WorkloadList(), None, out)
    out += _semantic_extra(problem, out)
    _raise_if(_in_file_order(out))


def check_worker_node(
    node: pb.Node,
    *,
    gpu_types: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    tenants: Iterable[Mapping[str, Any]],
) -> None:
    """Check the node of a worker's ``Register`` merged into the stored inventory
    (a stored node with the same id is replaced). Paths start at ``node``
    (``node.gpu_type``), the request's field.

    Raises:
        ValidationError: every broken rule.
    """
    if not node.id:
        raise ValidationError([Violation("node.id", "must not be empty")])
    try:
        check_inventory_update([], [node], [], gpu_types=gpu_types, nodes=nodes, tenants=tenants)
    except ValidationError as exc:
        raise ValidationError(_rebase(exc.violations, "nodes[0]", "node")) from None


def state_problem(
    *,
    gpu_types: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    tenants: Iterable[Mapping[str, Any]],
    workloads: Iterable[Mapping[str, Any]],
    current: Iterable[Mapping[str, Any]],
) -> Problem:
    """The domain problem of the server's state: stored dicts of the inventory,
    the active workloads' specs, and the placements that run now.

    Raises:
        ValidationError: the state is not a valid problem (``solver.validate``).
    """
    inventory = pb.Inventory(
        gpu_types=[gpu_type_from_dict(t) for t in gpu_types],
        nodes=[node_from_dict(n) for n in nodes],
        tenants=[tenant_from_dict(t) for t in tenants],
    )
    listed = pb.WorkloadList(workloads=[workload_from_dict(w) for w in workloads])
    placements = pb.Plan(placements=[json_format.ParseDict(dict(p), pb.Placement()) for p in current])
    out: list[Violation] = []
    problem = _build_problem(inventory, listed, placements, out)
    _raise_if(out)
    solver.validate(problem)
    return problem


# A day of work: more is a mistake (the wall-clock cap would cut it anyway).
MAX_WORK_LIMIT_S = 86_400.0


def plan_options(msg: apb.PlanOptions, *, deadline_s: float | None = None) -> PlanOptions:
    """Solver options of a ``Plan`` request; the time limit is cut to fit ``deadline_s``
    (seconds left before the call's deadline) so the best plan found in time comes back.

    Raises:
        ValidationError: a value out of range (paths ``options.*``).
    """
    out: list[Violation] = []
    defaults = PlanOptions()
    time_limit = msg.time_limit_s if msg.HasField("time_limit_s") else defaults.time_limit_s
    if not time_limit > 0 or not math.isfinite(time_limit):
        out.append(Violation("options.time_limit_s", "must be > 0"))
    work_limit = msg.work_limit_s if msg.HasField("work_limit_s") else None
    if work_limit is not None and not (0 < work_limit <= MAX_WORK_LIMIT_S):
        out.append(Violation("options.work_limit_s", f"must be > 0 and ≤ {MAX_WORK_LIMIT_S:g}"))
    gap = msg.relative_gap if msg.HasField("relative_gap") else defaults.relative_gap
    if not gap >= 0 or not math.isfinite(gap):
        out.append(Violation("options.relative_gap", "must be ≥ 0"))
    if msg.HasField("max_migrations") and msg.max_migrations < 0:
        out.append(Violation("options.max_migrations", "must be ≥ 0"))
    if msg.HasField("num_workers") and msg.num_workers < 0:
        out.append(Violation("options.num_workers", "must be ≥ 0"))
    backend = msg.backend or defaults.backend
    if backend not in BACKENDS:
        out.append(
            Violation("options.backend", f"must be one of {', '.join(BACKENDS)}; got {json.dumps(backend)}")
        )
    _raise_if(out)
    if deadline_s is not None:
        # The work budget comes from the limit asked for: a shorter deadline cuts the
        # search by the wall clock, and the plan says so (stopped_by: wall_clock).
        work_limit = PlanOptions(time_limit_s=time_limit, work_limit_s=work_limit).work_budget()
        time_limit = max(0.05, min(time_limit, deadline_s))
    return PlanOptions(
        time_limit_s=time_limit,
        work_limit_s=work_limit,
        seed=msg.seed if msg.HasField("seed") else defaults.seed,
        relative_gap=gap,
        backend=backend,
        max_migrations=msg.max_migrations if msg.HasField("max_migrations") else None,
        num_workers=msg.num_workers if msg.HasField("num_workers") else defaults.num_workers,
    )


def plan_request_problem(msg: apb.PlanRequest) -> Problem:
    """The problem of a ``Plan`` request, validated (paths as in the files:
    ``nodes[0].gpus``, ``workloads[1].inference.target_rps``, ``current[0]...``).

    Raises:
        ValidationError: every broken rule.
    """
    out: list[Violation] = []
    current = msg.current if msg.HasField("current") else None
    problem = _build_problem(msg.inventory, pb.WorkloadList(workloads=msg.workloads), current, out)
    extra = _semantic_extra(problem, out)
    _raise_if(_in_file_order(out + extra))
    return problem


def placement_to_dict(p: Placement) -> dict[str, Any]:
    return message_to_dict(placement_to_message(p))


def reasons_to_dicts(reasons: Iterable[Reason]) -> list[dict[str, Any]]:
    return [{"code": r.code.value, "message": r.message} for r in reasons]


def workload_status(row: WorkloadRowLike, *, workload: pb.Workload | None = None) -> apb.WorkloadStatus:
    """A stored workload as the API's status (``workload``: its spec as a message
    already at hand, instead of parsing ``row.spec`` again)."""
    msg = apb.WorkloadStatus(
        workload=workload if workload is not None else workload_from_dict(row.spec),
        state=row.state,
        version=row.version,
        reasons=[pb.Reason(code=r.get("code", ""), message=r.get("message", "")) for r in row.reasons],
        message=row.message,
        created_at=row.created_at,
        updated_at=row.updated_at,
        revision=row.revision,
    )
    if row.placement:
        shown = {k: v for k, v in row.placement.items() if k in ("workload_id", "gpu_type", "shards")}
        msg.placement.CopyFrom(json_format.ParseDict(shown, pb.Placement()))
        version = row.placement.get("version")
        if isinstance(version, int) and version != row.version:
            msg.serving_version = version
    observed = row.observed
    if "work_done" in observed:
        msg.work_done = float(observed["work_done"])
    for gpu_type, rate in sorted((observed.get("throughput") or {}).items()):
        msg.observed_throughput.add(
            gpu_type=gpu_type,
            gpus=int(rate.get("gpus", 0)),
            work_per_s=float(rate.get("work_per_s", 0.0)),
            samples_per_s=float(rate.get("samples_per_s", 0.0)),
            measured_s=float(rate.get("seconds", 0.0)),
            updated_at=float(rate.get("at", 0.0)),
        )
    return msg


def explanation_to_message(explanation: solver.Explanation, state: str = "") -> apb.Explanation:
    msg = apb.Explanation(
        workload_id=explanation.workload_id,
        placed=explanation.placed,
        summary=explanation.summary,
        details=list(explanation.details),
        state=state,
    )
    if explanation.placement is not None:
        msg.placement.CopyFrom(placement_to_message(explanation.placement))
    return msg


def plan_dict_for_tenant(data: Mapping[str, Any], visible: Callable[[str], bool]) -> dict[str, Any]:
    """A stored plan document with only the workloads ``visible`` says the caller may see."""
    out = dict(data)
    for key in ("placements", "unplaced", "shortfalls"):
        out[key] = [x for x in data.get(key, []) if visible(x.get("workload_id", ""))]
    return out


def plan_record(
    data: Mapping[str, Any], *, revision: int, based_on: int, created_at: float, solve_time_s: float
) -> apb.PlanRecord:
    return apb.PlanRecord(
        plan=json_format.ParseDict(dict(data), pb.Plan(), ignore_unknown_fields=True),
        revision=revision,
        based_on=based_on,
        created_at=created_at,
        solve_time_s=solve_time_s,
    )


def bad_request_status(violations: Sequence[Violation], message: str) -> status_pb2.Status:
    """INVALID_ARGUMENT as a ``google.rpc.Status`` with one ``BadRequest`` field
    violation per bad field (what ``grpc_status.rpc_status.to_status`` sends)."""
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.path, description=v.message)
            for v in violations
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    status.details.add().Pack(detail)
    return status


def field_violations(status: status_pb2.Status) -> list[Violation]:
    """The field violations of a ``google.rpc.Status`` (a client reading an error)."""
    out: list[Violation] = []
    for any_detail in status.details:
        if any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail = error_details_pb2.BadRequest()
            any_detail.Unpack(detail)
            out.extend(Violation(f.field, f.description) for f in detail.field_violations)
    return out


class EventLike(Protocol):
    """What :func:`event_message` reads of a stored event (``server.store.Event``)."""

    @property
    def revision(self) -> int: ...
    @property
    def time(self) -> float: ...
    @property
    def kind(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def data(self) -> dict[str, Any]: ...


class _Row:
    """A stored workload row rebuilt from an event's ``data`` (``WorkloadRow.as_dict``)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.spec: dict[str, Any] = data.get("spec", {})
        self.state: str = data.get("state", "")
        self.version: int = data.get("version", 0)
        self.placement: dict[str, Any] | None = data.get("placement")
        self.reasons: list[dict[str, Any]] = data.get("reasons", [])
        self.message: str = data.get("message", "")
        self.created_at: float = data.get("created_at", 0.0)
        self.updated_at: float = data.get("updated_at", 0.0)
        self.revision: int = data.get("revision", 0)
        self.observed: dict[str, Any] = data.get("observed") or {}  # absent in events of schema 1


def event_message(event: EventLike) -> apb.Event:
    """A stored change as a ``Watch`` event."""
    msg = apb.Event(revision=event.revision, time=event.time, action=event.action)
    data = event.data
    if event.kind == "workload":
        msg.workload.CopyFrom(workload_status(_Row(data)))
    elif event.kind == "node":
        msg.node.CopyFrom(node_from_dict(data.get("spec", {})))
    elif event.kind == "plan":
        msg.plan.CopyFrom(
            apb.PlanSummary(
                status=data.get("status", ""),
                objective=data.get("objective", 0.0),
                placed=int(data.get("placed", 0)),
                unplaced=int(data.get("unplaced", 0)),
                solve_time_s=data.get("solve_s", 0.0),
            )
        )
        if data.get("gap") is not None:
            msg.plan.gap = data["gap"]
    elif event.kind == "inventory" and "gpu_type" in data:
        msg.gpu_type.CopyFrom(gpu_type_from_dict(data["gpu_type"]))
    elif event.kind == "inventory" and "tenant" in data:
        msg.tenant.CopyFrom(tenant_from_dict(data["tenant"]))
    return msg


def problem_to_messages(problem: Problem) -> tuple[pb.Inventory, pb.WorkloadList]:
    """A :class:`solver.Problem` as the messages of its files (the inverse of
    :func:`problem_from_messages`, ``current`` aside): what a client sends to
    ``Plan`` or ``SubmitWorkload`` for a problem built in Python."""
    inventory = pb.Inventory()
    for t in problem.gpu_types:
        gt = inventory.gpu_types.add(name=t.name, memory_gib=t.memory_gib)
        if t.cost_per_hour is not None:
            gt.cost_per_hour = t.cost_per_hour
    for n in problem.nodes:
        inventory.nodes.add(
            id=n.id,
            gpu_type=n.gpu_type,
            gpus=n.gpus,
            cpus=n.cpus,
            memory_gib=n.memory_gib,
            zone=n.zone,
            domain=n.domain,
            labels=dict(n.labels),
            state=n.state.value,
        )
    for tenant in problem.tenants:
        tm = inventory.tenants.add(name=tenant.name, max_gpus_per_type=dict(tenant.max_gpus_per_type))
        if tenant.max_gpus is not None:
            tm.max_gpus = tenant.max_gpus
        tm.weight = tenant.weight
    workloads = pb.WorkloadList()
    for w in problem.workloads:
        wm = workloads.workloads.add(
            id=w.id,
            tenant=w.tenant,
            priority=w.priority,
            weight=w.weight,
            allowed_gpu_types=list(w.allowed_gpu_types),
            node_selector=dict(w.node_selector),
            submit_time_s=w.submit_time_s,
        )
        if w.training is not None:
            spec = w.training
            wm.training.SetInParent()
            if len(spec.shapes) == 1:
                wm.training.gpus = spec.shapes[0].gpus
                wm.training.throughput.update(spec.shapes[0].throughput)
            else:
                for s in spec.shapes:
                    wm.training.elastic.add(gpus=s.gpus, throughput=dict(s.throughput))
            wm.training.gpu_memory_gib = spec.gpu_memory_gib
            wm.training.cpus_per_gpu = spec.cpus_per_gpu
            wm.training.memory_gib_per_gpu = spec.memory_gib_per_gpu
            wm.training.locality = spec.locality.value
            if spec.remaining_work is not None:
                wm.training.remaining_work = spec.remaining_work
            if spec.deadline_s is not None:
                wm.training.deadline_s = spec.deadline_s
            wm.training.preemptible = spec.preemptible
        elif w.inference is not None:
            svc = w.inference
            wm.inference.SetInParent()
            wm.inference.gpus_per_replica.update(svc.gpus_per_replica)
            wm.inference.replica_rps.update(svc.replica_rps)
            wm.inference.target_rps = svc.target_rps
            wm.inference.min_replicas = svc.min_replicas
            if svc.max_replicas is not None:
                wm.inference.max_replicas = svc.max_replicas
            wm.inference.cpus_per_replica = svc.cpus_per_replica
            wm.inference.memory_gib_per_replica = svc.memory_gib_per_replica
            wm.inference.spread = svc.spread.value
    return inventory, workloads


# ----- a service's checkpoint source

SERVE_FROM = "APPORTION_SERVE_FROM"  # a service's env: the training workload (or path) it serves from


def checkpoint_name(value: str) -> str | None:
    """The training workload an ``APPORTION_SERVE_FROM`` value names (a bare name, not a
    path, as the agent reads it), else None."""
    if value and "/" not in value and value not in (".", ".."):
        return value
    return None


def serve_from(workload: pb.Workload) -> str | None:
    """The training workload whose checkpoints a service's replicas load, if it names one."""
    if workload.WhichOneof("spec") != "inference":
        return None
    return checkpoint_name(workload.runtime.env.get(SERVE_FROM, ""))


# ----- a workload's runtime (what the workers run)

BUILTINS = ("train-lm", "serve-lm")
RUNTIME_LIMITS = {"argv": 256, "arg_chars": 4096, "env": 256, "env_name_chars": 256, "env_value_chars": 65536}
"""At most 256 ``command`` and 256 ``args`` entries of 4,096 characters each, 256 ``env``
entries with names of at most 256 characters and values of at most 64 KiB."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENTRYPOINT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def check_runtime(runtime: pb.Runtime, path: str) -> list[Violation]:
    """The violations of a workload's runtime: exactly one of ``builtin`` (a known one),
    ``entrypoint`` (``module:function``) or ``command``; bounded ``command``, ``args`` and
    ``env`` (:data:`RUNTIME_LIMITS`); no NUL anywhere (it cannot reach a process)."""
    out: list[Violation] = []
    given = [k for k in ("builtin", "entrypoint", "command") if getattr(runtime, k)]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        out.append(Violation(path, f"needs exactly one of builtin, entrypoint or command (got {what})"))
    if runtime.builtin and runtime.builtin not in BUILTINS:
        out.append(Violation(f"{path}.builtin", f"must be one of {', '.join(BUILTINS)}"))
    if runtime.entrypoint and not _ENTRYPOINT.fullmatch(runtime.entrypoint):
        out.append(Violation(f"{path}.entrypoint", 'must be "module:function" (Python identifiers)'))
    for field in ("command", "args"):
        items = getattr(runtime, field)
        if len(items) > RUNTIME_LIMITS["argv"]:
            out.append(Violation(f"{path}.{field}", f"must have at most {RUNTIME_LIMITS['argv']} entries"))
            continue
        for i, item in enumerate(items):
            if len(item) > RUNTIME_LIMITS["arg_chars"] or "\x00" in item:
                out.append(
                    Violation(
                        f"{path}.{field}[{i}]",
                        f"must be at most {RUNTIME_LIMITS['arg_chars']} characters, no NUL",
                    )
                )
    if len(runtime.env) > RUNTIME_LIMITS["env"]:
        out.append(Violation(f"{path}.env", f"must have at most {RUNTIME_LIMITS['env']} entries"))
        return out
    for name, value in sorted(runtime.env.items()):
        if len(name) > RUNTIME_LIMITS["env_name_chars"] or not _ENV_NAME.fullmatch(name):
            out.append(
                Violation(f"{path}.env", "names must be letters, digits and _, not starting with a digit")
            )
        elif len(value) > RUNTIME_LIMITS["env_value_chars"] or "\x00" in value:
            out.append(Violation(f'{path}.env["{name}"]', "must be at most 64 KiB, no NUL"))
    return out
