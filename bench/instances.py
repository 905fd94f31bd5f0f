"""Realistic planning instances built from the public data in ``data/``.

Every number that the data has is taken from the data; everything else is
assigned by a stated rule or with a fixed seed, and said so below. Sources
(see ``data/README.md`` for repositories, commits and licences):

* Gavel (Narayanan et al., OSDI 2020; MIT): ``gavel/simulation_throughputs.json``
  and ``gavel/physical_cluster_throughputs.json`` - measured steps/s of 26 job
  types on K80, P100 and V100 for 1, 2, 4 and 8 GPUs (isolated numbers, key
  ``"null"``); ``gavel/traces/physical_cluster/*.trace`` - Gavel's job traces.
* Alibaba PAI 2020 (CC-BY-4.0): ``alibaba_pai_v2020/pai_machine_spec.csv`` -
  the shape (GPUs, CPUs, memory) and the type mix of 1,814 GPU machines.
* Microsoft Philly 2017 via Pollux (Apache-2.0): ``pollux_osdi21/philly.csv`` -
  the joint distribution of (GPU count, duration, submit time) of 82,247 jobs.
* TensorRT-LLM v0.9.0 performance tables (Apache-2.0): ``trtllm_perf/`` - output
  tokens/s per GPU and the tensor-parallel degree of six LLMs on A100, L40S,
  H100 and H200.
* Azure LLM inference trace 2023 (CC-BY-4.0): ``azure_llm_2023/`` - one hour of
  requests of a code and a conversation service (request rate, tokens).

Choices made here (the data is silent on them):

GPU types
    Training jobs can use the types Gavel measured - ``k80``, ``p100``,
    ``v100`` - plus ``v100m32`` (Alibaba's 32 GB V100), which gets Gavel's V100
    numbers unchanged: same GV100 chip and clocks, only the memory differs.
    Inference services can use the types TensorRT-LLM measured - ``a100``,
    ``l40s``, ``h100``, ``h200``. No data relates the two families (Gavel has
    no A100/H100 numbers, TensorRT-LLM no V100/K80), so no throughput is
    invented across them: training and inference use disjoint GPU types.

Inventory (:func:`inventory`)
    Nodes are drawn from the PAI machine table preserving its mix of machine
    shapes exactly (largest-remainder rounding, seeded tie-breaks); CPU-only
    rows are skipped. PAI's types map to ours as P100 -> ``p100``, V100 ->
    ``v100``, V100M32 -> ``v100m32``; two PAI types have no throughput data and
    are *substituted*: the T4 machines (2 GPUs, 96 CPUs, 512 GiB) become ``k80``
    machines of the same shape (the cluster's low tier; this is not a claim that
    a T4 performs like a K80), and the MISC machines (8 GPUs of a model Alibaba
    does not name, 96 CPUs, 512 GiB) form the LLM partition, split in equal
    quarters over ``a100``/``l40s``/``h100``/``h200``. Each node keeps the PAI
    type it stands for in the label ``pai_gpu_type``.
    Topology (a stated rule): nodes of one GPU type are grouped into racks
    (``domain``) of at most 16 eight-GPU nodes (128 GPUs) or 32 two-GPU nodes
    (64 GPUs), and every type gets at least as many racks as there are zones
    (when it has that many nodes) so that every type is present in every zone.
    Racks are dealt to zones round-robin. Zones: 3 from 48 nodes up, else 2
    (1 for a single node).

Training jobs (:func:`training_jobs`)
    A job is one Philly row (GPU count, duration, submit time) drawn uniformly
    with the seed, restricted to GPU counts 1, 2, 4, 8, 16 and 32, plus a Gavel
    job type drawn uniformly among those with numbers for that count (as Gavel's
    own generator does). Throughputs are Gavel's isolated numbers; a type whose
    number is 0 is omitted (ResNet-50 at batch 128 on K80 for 2+ GPUs: out of
    memory; the 1-GPU K80 number, 0.35 steps/s, is kept, and the job's GPU
    memory need rules the K80 out instead).
    16- and 32-GPU numbers are extrapolated from the 8-GPU number, doubling with
    the job's own measured 4->8 GPU scaling efficiency ``thr8 / (2 thr4)``
    (capped at 1) per doubling. ``remaining_work`` (steps) is the Philly
    duration times the job's V100 throughput at its GPU count (Gavel's
    convention: ``reference_worker_type='v100'``). With the seed: 20 % of the
    jobs whose type has several measured counts are elastic (shapes ``g/2, g,
    2g`` that have numbers); 20 % get a deadline of 1.5-3x their V100 run time;
    priority tiers 0/1/2 with probability 70/25/5 %; 10 % are not preemptible;
    tenants uniform. Locality: ``node`` up to 2 GPUs (every node holds 2), else
    ``domain`` (a 4-8 GPU gang fits one 8-GPU node or spans 2-4 two-GPU nodes of
    one rack). GPU memory per GPU is an *estimate* (:func:`gavel_gpu_memory_gib`)
    anchored on the one fact in the data: ResNet-50 at batch 128 does not run on
    a 12 GiB K80 (0 steps/s at every GPU count in Gavel's physical-cluster
    table) but does on 16 GiB GPUs; all other job types ran on K80s, so their
    estimates stay below 12 GiB. Host CPUs and memory per GPU are assigned:
    8 CPUs / 32 GiB for ImageNet ResNet-50 (Gavel's command line runs 8 data
    loader workers, ``-j 8``), 4 CPUs / 16 GiB for the others.

Inference services (:func:`inference_services`)
    A service draws one Azure trace (code or conversation) and one of the six
    TensorRT-LLM models with the seed. The TensorRT-LLM row used is the
    (input, output) length pair nearest to the trace's mean context and
    generated tokens in log space ((2048, 128) for both traces). For each GPU
    type: ``gpus_per_replica = tp`` and ``replica_rps = tokens/s per GPU x tp /
    mean generated tokens per request`` (a peak, large-batch figure: treat it as
    a relative capacity). ``target_rps`` = the trace's mean request rate x a
    factor drawn log-uniformly in [1, 16] (the public trace is a sample of the
    production traffic). Assigned with the seed: spread zone/domain/node with
    probability 60/20/20 %; tenants uniform. ``min_replicas`` = 2, ``max_replicas``
    = the replicas needed on the slowest type (more never help), priority 2,
    8 CPUs and 48 GiB of host memory per GPU of the smallest replica.

Tenants (:func:`make_tenants`)
    With the seed: weight 1, 2 or 3; ``max_gpus`` = 20-50 % of the cluster's GPUs;
    half of them also capped at 25 % of the H100 GPUs.

Data location: the ``data`` argument, else the ``APPORTION_DATA`` environment
variable, else ``<repo>/data``.
"""

from __future__ import annotations

import ast
import csv
import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from solver.model import (
    GangShape,
    GpuType,
    InferenceSpec,
    Locality,
    Node,
    Problem,
    Spread,
    Tenant,
    TrainingSpec,
    Workload,
)

__all__ = [
    "DATA_ENV",
    "DEFAULT_DATA_DIR",
    "DEFAULT_TENANTS",
    "GAVEL_CLUSTER",
    "INFERENCE_TYPES",
    "TRAINING_TYPES",
    "AzureTraceStats",
    "TrtllmRow",
    "azure_trace_stats",
    "data_dir",
    "gavel_gpu_memory_gib",
    "gavel_job_type",
    "gavel_problem",
    "gavel_slug",
    "gavel_throughputs",
    "gpu_types",
    "inference_services",
    "inventory",
    "make_tenants",
    "philly_jobs",
    "problem",
    "service_capacity",
    "summary",
    "training_jobs",
    "trtllm_rows",
]

DATA_ENV = "APPORTION_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # the repository's copy (data/README.md)

PathArg = str | os.PathLike[str] | None

# --------------------------------------------------------------------------- GPU types

# name -> (memory_gib, cost_per_hour). Memory sizes are public spec facts (K80:
# 12 GiB per GK210 die, one die = one GPU as CUDA sees it; A100 80 GB SXM, the
# part in TensorRT-LLM's tables; H200 141 GB). Prices are public on-demand
# list prices per GPU-hour in USD, APPROXIMATE, and change over time:
#   k80 0.45, p100 1.46, v100 2.48: Google Cloud Compute Engine GPU price list,
#       us-central1, GPU only (long-standing list prices).
#   v100m32 2.48: no separate list price at hand for the 32 GB V100; priced as V100.
#   a100 3.67: ~ Google Cloud a2-highgpu-1g on-demand, us-central1 (one A100
#       with its share of host), approx.
#   l40s 1.86: ~ AWS g6e.xlarge on-demand, us-east-1 (one L40S + host), approx.
#   h100 12.29: AWS p5.48xlarge on-demand $98.32/h / 8 GPUs (us-east-1 list
#       2023-24; AWS has cut P5 prices since).
#   h200 13.52: h100 x 1.10, the ratio of AWS EC2 Capacity Block accelerator
#       rates p5e (H200) $5.408 / p5 (H100) $4.916 (late-2024 table), approx.
_GPU_TYPES: dict[str, tuple[float, float]] = {
    "k80": (12.0, 0.45),
    "p100": (16.0, 1.46),
    "v100": (16.0, 2.48),
    "v100m32": (32.0, 2.48),
    "a100": (80.0, 3.67),
    "l40s": (48.0, 1.86),
    "h100": (80.0, 12.29),
    "h200": (141.0, 13.52),
}

GAVEL_TYPES: tuple[str, ...] = ("k80", "p100", "v100")
TRAINING_TYPES: tuple[str, ...] = ("k80", "p100", "v100", "v100m32")
INFERENCE_TYPES: tuple[str, ...] = ("a100", "l40s", "h100", "h200")
_TRTLLM_GPU = {"A100": "a100", "L40S": "l40s", "H100": "h100", "H200": "h200"}


def gpu_types(names: Sequence[str] | None = None) -> tuple[GpuType, ...]:
    """The GPU types the data has throughputs for (all, or the ``names`` given)."""
    chosen = tuple(_GPU_TYPES) if names is None else tuple(names)
    unknown = [n for n in chosen if n not in _GPU_TYPES]
    if unknown:
        raise ValueError(f"unknown GPU types {unknown}; known: {sorted(_GPU_TYPES)}")
    return tuple(GpuType(n, _GPU_TYPES[n][0], _GPU_TYPES[n][1]) for n in chosen)


# --------------------------------------------------------------------------- data access


def data_dir(data: PathArg = None) -> Path:
    """Resolve the data folder: ``data``, else ``$APPORTION_DATA``, else ``<repo>/data``."""
    env = os.environ.get(DATA_ENV)
    path = Path(data) if data is not None else Path(env) if env else DEFAULT_DATA_DIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path} not found: pass data=... or set {DATA_ENV} (default is <repo>/data)"
        )
    return path


_GAVEL_KEY = re.compile(r"^(?P<family>.+?) \(batch size (?P<batch>\d+)\)$")


def gavel_slug(job_type: str) -> str:
    """A short id-friendly name: ``'ResNet-18 (batch size 64)'`` -> ``'resnet-18-bs64'``."""
    m = _GAVEL_KEY.match(job_type)
    if m is None:
        return job_type.lower().replace(" ", "-")
    return f"{m['family'].lower().replace(' ', '-')}-bs{m['batch']}"


@functools.lru_cache(maxsize=8)
def _gavel_table(path: Path, file: str) -> dict[tuple[str, int], dict[str, float]]:
    raw = json.loads((path / "gavel" / file).read_text())
    table: dict[tuple[str, int], dict[str, float]] = {}
    for gpu in GAVEL_TYPES:
        for key, entry in raw[gpu].items():
            job_type, count = ast.literal_eval(key)
            thr = float(entry["null"])
            if thr > 0:  # Gavel writes 0 where the job does not run (out of memory)
                table.setdefault((str(job_type), int(count)), {})[gpu] = thr
    return table


def gavel_throughputs(
    data: PathArg = None, file: str = "simulation_throughputs.json"
) -> dict[tuple[str, int], dict[str, float]]:
    """Gavel's isolated throughputs: ``(job type, GPUs) -> {k80|p100|v100: steps/s}``.

    Exactly the JSON's ``"null"`` values; types whose value is 0 are left out.
    """
    return {k: dict(v) for k, v in _gavel_table(data_dir(data), file).items()}


def gavel_job_type(slug: str, data: PathArg = None) -> str:
    """Inverse of :func:`gavel_slug` over the job types in Gavel's table."""
    for job_type, _ in _gavel_table(data_dir(data), "simulation_throughputs.json"):
        if gavel_slug(job_type) == slug:
            return job_type
    raise KeyError(slug)


# GPU memory per GPU (GiB) as base + per_sample x batch: ESTIMATES, not data.
# The only anchor in the data: Gavel's K80 number for ResNet-50 at batch 128 is
# 0 (does not fit 12 GiB; physical-cluster table at every GPU count, simulation
# table from 2 GPUs) while it runs on 16 GiB P100/V100, so its estimate is in
# (12, 16]; every other job type ran on K80, so its estimate is < 12.
_MEM_LINEAR: dict[str, tuple[float, float]] = {
    "ResNet-50": (2.0, 0.09),  # ImageNet 224x224: bs128 -> 13.5 GiB
    "ResNet-18": (1.0, 0.01),  # CIFAR-10 32x32: bs256 -> 3.6 GiB
    "Transformer": (2.0, 0.03),  # Multi30k: bs256 -> 9.7 GiB
    "LM": (1.0, 0.05),  # Wikitext-2 LSTM: bs80 -> 5.0 GiB
    "Recommendation": (1.0, 0.0005),  # ML-20M autoencoder: bs8192 -> 5.1 GiB
}
_MEM_FIXED: dict[str, float] = {"A3C": 1.5, "CycleGAN": 4.0}


def gavel_gpu_memory_gib(job_type: str) -> float:
    """Estimated GPU memory per GPU of a Gavel job type (see the comment above)."""
    m = _GAVEL_KEY.match(job_type)
    if m is not None and m["family"] in _MEM_LINEAR:
        base, per_sample = _MEM_LINEAR[m["family"]]
        return round(base + per_sample * int(m["batch"]), 2)
    return _MEM_FIXED.get(job_type, 4.0)


def _host_per_gpu(job_type: str) -> tuple[float, float]:
    """(CPUs, GiB) of host per GPU: assigned; ImageNet ResNet-50 runs 8 loader workers in Gavel."""
    return (8.0, 32.0) if job_type.startswith("ResNet-50") else (4.0, 16.0)


@dataclass(frozen=True)
class _Philly:
    gpus: np.ndarray  # int64
    duration_s: np.ndarray  # float64
    submit_s: np.ndarray  # float64, seconds since the trace's first submission


@functools.lru_cache(maxsize=4)
def _philly(path: Path) -> _Philly:
    gpus: list[int] = []
    dur: list[float] = []
    stamps: list[str] = []
    with (path / "pollux_osdi21" / "philly.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("timestamp") or not row.get("num_gpus") or not row.get("duration"):
                continue
            d = float(row["duration"])
            if d <= 0:
                continue
            gpus.append(int(row["num_gpus"]))
            dur.append(d)
            stamps.append(row["timestamp"])
    ts = np.array(stamps, dtype="datetime64[s]").astype(np.int64)
    return _Philly(np.array(gpus, dtype=np.int64), np.array(dur), (ts - ts.min()).astype(np.float64))


def philly_jobs(data: PathArg = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Philly's (num_gpus, duration_s, submit_s) columns (rows with a positive duration)."""
    p = _philly(data_dir(data))
    return p.gpus.copy(), p.duration_s.copy(), p.submit_s.copy()


@dataclass(frozen=True)
class TrtllmRow:
    gpu: str  # our type name
    model: str
    tp: int
    input_len: int
    output_len: int
    tokens_per_s_per_gpu: float


@functools.lru_cache(maxsize=4)
def _trtllm(path: Path) -> tuple[TrtllmRow, ...]:
    rows: list[TrtllmRow] = []
    with (path / "trtllm_perf" / "trtllm_v0.9.0_peak_throughput.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                TrtllmRow(
                    gpu=_TRTLLM_GPU[r["gpu"]],
                    model=r["model"],
                    tp=int(r["tp"]),
                    input_len=int(r["input_len"]),
                    output_len=int(r["output_len"]),
                    tokens_per_s_per_gpu=float(r["throughput_out_tok_per_s_per_gpu"]),
                )
            )
    return tuple(rows)


def trtllm_rows(data: PathArg = None) -> tuple[TrtllmRow, ...]:
    """TensorRT-LLM v0.9.0 peak-throughput table, GPU names mapped to ours."""
    return _trtllm(data_dir(data))


@dataclass(frozen=True)
class AzureTraceStats:
    name: str  # "code" or "conv"
    requests: int
    duration_s: float
    mean_rps: float
    peak_minute_rps: float
    mean_context_tokens: float
    mean_generated_tokens: float


@functools.lru_cache(maxsize=4)
def _azure(path: Path) -> dict[str, AzureTraceStats]:
    out: dict[str, AzureTraceStats] = {}
    for name in ("code", "conv"):
        stamps: list[datetime] = []
        ctx: list[int] = []
        gen: list[int] = []
        with (path / "azure_llm_2023" / f"AzureLLMInferenceTrace_{name}.csv").open(newline="") as f:
            for r in csv.DictReader(f):
                stamps.append(datetime.fromisoformat(r["TIMESTAMP"][:26]))
                ctx.append(int(r["ContextTokens"]))
                gen.append(int(r["GeneratedTokens"]))
        t0 = min(stamps)
        secs = np.array([(s - t0).total_seconds() for s in stamps])
        span = float(secs.max())
        per_minute = np.bincount((secs // 60).astype(np.int64))
        out[name] = AzureTraceStats(
            name=name,
            requests=len(stamps),
            duration_s=span,
            mean_rps=len(stamps) / span,
            peak_minute_rps=float(per_minute.max()) / 60.0,
            mean_context_tokens=float(np.mean(ctx)),
            mean_generated_tokens=float(np.mean(gen)),
        )
    return out


def azure_trace_stats(data: PathArg = None) -> dict[str, AzureTraceStats]:
    """Request rate and token statistics of the two Azure LLM traces."""
    return dict(_azure(data_dir(data)))


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, stream: int) -> np.random.Generator:
    """One independent generator per builder, so changing one does not shift another."""
    return np.random.default_rng([seed, stream])


def _largest_remainder(weights: Sequence[float], total: int, rng: np.random.Generator) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``weights``; seeded tie-breaks."""
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * total
    base = np.floor(quota).astype(np.int64)
    left = total - int(base.sum())
    frac = quota - base
    tiebreak = rng.permutation(len(w))
    order = sorted(range(len(w)), key=lambda i: (-frac[i], tiebreak[i]))
    for i in order[:left]:
        base[i] += 1
    return [int(x) for x in base]


# --------------------------------------------------------------------------- inventory


@dataclass(frozen=True)
class _Shape:
    pai_type: str
    gpu_type: str
    gpus: int
    cpus: float
    memory_gib: float


_PAI_TO_TYPE = {"P100": "p100", "T4": "k80", "V100": "v100", "V100M32": "v100m32"}


@functools.lru_cache(maxsize=4)
def _pai_shapes(path: Path) -> tuple[tuple[_Shape, float], ...]:
    counts: dict[tuple[str, float, float, int], int] = {}
    folder = path / "alibaba_pai_v2020"
    # The CSV has no header line; Alibaba ships the column names separately.
    fields = (folder / "pai_machine_spec.header").read_text().strip().split(",")
    with (folder / "pai_machine_spec.csv").open(newline="") as f:
        for r in csv.DictReader(f, fieldnames=fields):
            gpus = int(r["cap_gpu"])
            if gpus <= 0 or r["gpu_type"] == "CPU":
                continue
            key = (r["gpu_type"], float(r["cap_cpu"]), float(r["cap_mem"]), gpus)
            counts[key] = counts.get(key, 0) + 1
    shapes: list[tuple[_Shape, float]] = []
    for (pai, cpus, mem, gpus), n in sorted(counts.items()):
        if pai == "MISC":  # unnamed 8-GPU machines: the LLM partition, equal quarters
            for t in INFERENCE_TYPES:
                shapes.append((_Shape(pai, t, gpus, cpus, mem), n / len(INFERENCE_TYPES)))
        elif pai in _PAI_TO_TYPE:
            shapes.append((_Shape(pai, _PAI_TO_TYPE[pai], gpus, cpus, mem), float(n)))
    return tuple(shapes)


def _default_zones(n_nodes: int) -> int:
    return 1 if n_nodes < 2 else 2 if n_nodes < 48 else 3


def inventory(
    n_nodes: int,
    seed: int = 0,
    *,
    data: PathArg = None,
    zones: int | None = None,
    llm_partition: bool = True,
) -> tuple[Node, ...]:
    """``n_nodes`` nodes with PAI's machine shapes and type mix (see the module docstring).

    ``llm_partition=False`` leaves out the MISC-derived A100/L40S/H100/H200 nodes.
    """
    if n_nodes < 0:
        raise ValueError("n_nodes must be >= 0")
    rng = _rng(seed, 1)
    shapes = [(s, w) for s, w in _pai_shapes(data_dir(data)) if llm_partition or s.pai_type != "MISC"]
    counts = _largest_remainder([w for _, w in shapes], n_nodes, rng) if n_nodes else [0] * len(shapes)
    n_zones = zones if zones is not None else _default_zones(n_nodes)
    if n_zones < 1:
        raise ValueError("zones must be >= 1")
    zone_names = [f"zone-{chr(ord('a') + z)}" if n_zones <= 26 else f"zone-{z:02d}" for z in range(n_zones)]

    by_type: dict[str, list[_Shape]] = {}
    for (shape, _), c in zip(shapes, counts, strict=True):
        by_type.setdefault(shape.gpu_type, []).extend([shape] * c)

    nodes: list[Node] = []
    rack = 0
    next_zone = 0
    for gpu_type in (*TRAINING_TYPES, *INFERENCE_TYPES):
        members = by_type.get(gpu_type, [])
        if not members:
            continue
        order = rng.permutation(len(members))  # which machine shape lands in which rack
        members = [members[i] for i in order]
        per_rack = 16 if members[0].gpus >= 8 else 32
        n_racks = max(math.ceil(len(members) / per_rack), min(n_zones, len(members)))
        for chunk in np.array_split(np.arange(len(members)), n_racks):
            zone = zone_names[next_zone % n_zones]
            domain = f"rack-{rack:03d}"
            for i in chunk:
                s = members[int(i)]
                nodes.append(
                    Node(
                        id=f"node-{len(nodes):05d}",
                        gpu_type=s.gpu_type,
                        gpus=s.gpus,
                        cpus=s.cpus,
                        memory_gib=s.memory_gib,
                        zone=zone,
                        domain=domain,
                        labels={"pai_gpu_type": s.pai_type},
                    )
                )
            rack += 1
            next_zone += 1
    return tuple(nodes)


# --------------------------------------------------------------------------- training jobs

_COUNTS = (1, 2, 4, 8, 16, 32)
DEFAULT_TENANTS: tuple[str, ...] = tuple(f"team-{i}" for i in range(6))


def _training_table(path: Path, types: tuple[str, ...]) -> dict[tuple[str, int], dict[str, float]]:
    """Gavel's table + v100m32 (= V100) + 16/32-GPU extrapolation, restricted to ``types``."""
    base = _gavel_table(path, "simulation_throughputs.json")
    table: dict[tuple[str, int], dict[str, float]] = {}
    for key, thr in base.items():
        row = dict(thr)
        if "v100" in row:
            row["v100m32"] = row["v100"]  # same chip and clocks; only memory differs
        table[key] = row
    for job_type in sorted({j for j, _ in base}):
        four, eight = table.get((job_type, 4)), table.get((job_type, 8))
        if not four or not eight:
            continue
        prev = eight
        for count in (16, 32):
            row = {}
            for t, thr8 in eight.items():
                if t in four and t in prev:
                    eff = min(1.0, thr8 / (2.0 * four[t]))
                    row[t] = prev[t] * 2.0 * eff
            table[(job_type, count)] = row
            prev = row
    out: dict[tuple[str, int], dict[str, float]] = {}
    for key, row in table.items():
        kept = {t: v for t, v in row.items() if t in types}
        if kept:
            out[key] = kept
    return out


def training_jobs(
    n: int,
    seed: int = 0,
    types: Sequence[str] | None = None,
    *,
    tenants: Sequence[str] = DEFAULT_TENANTS,
    data: PathArg = None,
    elastic_fraction: float = 0.2,
    deadline_fraction: float = 0.2,
    id_prefix: str = "train",
) -> tuple[Workload, ...]:
    """``n`` training jobs from Philly's job mix and Gavel's throughputs (see the module docstring).

    ``types`` restricts the GPU types jobs list throughputs for (default: all
    training types); job types with no number on any of them are not drawn.
    Ids are ``<prefix>-<index>-<gavel slug>``.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    allowed = tuple(TRAINING_TYPES if types is None else types)
    if not set(allowed) & set(TRAINING_TYPES):
        raise ValueError(f"no training throughput exists for types {allowed}; use {TRAINING_TYPES}")
    path = data_dir(data)
    table = _training_table(path, allowed)
    candidates = {c: sorted(j for j, k in table if k == c) for c in _COUNTS}
    counts_with_jobs = np.array([c for c in _COUNTS if candidates[c]], dtype=np.int64)
    philly = _philly(path)
    keep = np.flatnonzero(np.isin(philly.gpus, counts_with_jobs))
    if n and keep.size == 0:
        raise ValueError("no Philly job has a GPU count with throughput data")

    rng = _rng(seed, 2)
    rows = keep[rng.integers(0, keep.size, size=n)] if n else keep[:0]
    u_type, u_elastic, u_deadline, u_slack, u_prio, u_pre, u_tenant = rng.random((7, n))
    t0 = float(philly.submit_s[rows].min()) if n else 0.0

    jobs: list[Workload] = []
    for i in range(n):
        r = int(rows[i])
        g = int(philly.gpus[r])
        cand = candidates[g]
        job_type = cand[int(u_type[i] * len(cand))]
        counts = [g]
        if u_elastic[i] < elastic_fraction:
            counts = [c for c in (g // 2, g, 2 * g) if c >= 1 and (job_type, c) in table]
            if len(counts) < 2:
                counts = [g]
        shapes = tuple(GangShape(c, table[(job_type, c)]) for c in sorted(set(counts)))
        thr_g = table[(job_type, g)]
        ref = thr_g.get("v100", max(thr_g.values()))  # Gavel's reference type is V100
        duration = float(philly.duration_s[r])
        deadline = duration * (1.5 + 1.5 * float(u_slack[i])) if u_deadline[i] < deadline_fraction else None
        prio = 2 if u_prio[i] < 0.05 else 1 if u_prio[i] < 0.30 else 0
        cpus, mem = _host_per_gpu(job_type)
        biggest = max(s.gpus for s in shapes)
        jobs.append(
            Workload(
                id=f"{id_prefix}-{i:05d}-{gavel_slug(job_type)}",
                tenant=tenants[int(u_tenant[i] * len(tenants))] if tenants else "",
                priority=prio,
                weight=1.0,
                submit_time_s=float(philly.submit_s[r]) - t0,
                training=TrainingSpec(
                    shapes=shapes,
                    gpu_memory_gib=gavel_gpu_memory_gib(job_type),
                    cpus_per_gpu=cpus,
                    memory_gib_per_gpu=mem,
                    locality=Locality.NODE if biggest <= 2 else Locality.DOMAIN,
                    remaining_work=duration * ref,
                    deadline_s=deadline,
                    preemptible=bool(u_pre[i] >= 0.10),
                ),
            )
        )
    return tuple(jobs)


# --------------------------------------------------------------------------- inference services

_MODEL_SLUG = {
    "GPT-J 6B": "gptj-6b",
    "Mistral 7B": "mistral-7b",
    "Mixtral 8x7B": "mixtral-8x7b",
    "LLaMA 7B": "llama-7b",
    "LLaMA 70B": "llama-70b",
    "Falcon 180B": "falcon-180b",
}


def _nearest_pair(rows: Sequence[TrtllmRow], stats: AzureTraceStats) -> tuple[int, int]:
    pairs = sorted({(r.input_len, r.output_len) for r in rows})

    def dist(p: tuple[int, int]) -> float:
        return abs(math.log(p[0] / stats.mean_context_tokens)) + abs(
            math.log(p[1] / stats.mean_generated_tokens)
        )

    return min(pairs, key=dist)


def service_capacity(
    model: str, trace: str, types: Sequence[str] | None = None, data: PathArg = None
) -> tuple[dict[str, int], dict[str, float]]:
    """(gpus_per_replica, replica_rps) per type for ``model`` under ``trace``'s request mix."""
    path = data_dir(data)
    rows = _trtllm(path)
    stats = _azure(path)[trace]
    inp, out = _nearest_pair(rows, stats)
    allowed = set(INFERENCE_TYPES if types is None else types)
    gpr: dict[str, int] = {}
    rps: dict[str, float] = {}
    for r in rows:
        if r.model == model and r.input_len == inp and r.output_len == out and r.gpu in allowed:
            gpr[r.gpu] = r.tp
            rps[r.gpu] = r.tokens_per_s_per_gpu * r.tp / stats.mean_generated_tokens
    return gpr, rps


def inference_services(
    n: int,
    seed: int = 0,
    types: Sequence[str] | None = None,
    *,
    tenants: Sequence[str] = DEFAULT_TENANTS,
    data: PathArg = None,
    rps_scale: tuple[float, float] = (1.0, 16.0),
    id_prefix: str = "svc",
) -> tuple[Workload, ...]:
    """``n`` LLM services from TensorRT-LLM capacities and Azure demand (see the module docstring).

    Ids are ``<prefix>-<index>-<model>-<trace>``.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    allowed = tuple(INFERENCE_TYPES if types is None else types)
    if not set(allowed) & set(INFERENCE_TYPES):
        raise ValueError(f"no inference throughput exists for types {allowed}; use {INFERENCE_TYPES}")
    path = data_dir(data)
    stats = _azure(path)
    models = sorted(_MODEL_SLUG)
    capacity = {(m, tr): service_capacity(m, tr, allowed, path) for m in models for tr in ("code", "conv")}
    usable = {tr: [m for m in models if capacity[(m, tr)][0]] for tr in ("code", "conv")}
    rng = _rng(seed, 3)
    u_trace, u_model, u_scale, u_spread, u_tenant = rng.random((5, n))
    lo, hi = math.log(rps_scale[0]), math.log(rps_scale[1])
    out: list[Workload] = []
    for i in range(n):
        trace = "code" if u_trace[i] < 0.5 else "conv"
        model = usable[trace][int(u_model[i] * len(usable[trace]))]
        gpr, rps = capacity[(model, trace)]
        target = stats[trace].mean_rps * math.exp(lo + (hi - lo) * float(u_scale[i]))
        spread = Spread.ZONE if u_spread[i] < 0.6 else Spread.DOMAIN if u_spread[i] < 0.8 else Spread.NODE
        min_tp = min(gpr.values())
        max_useful = math.ceil(target / min(rps.values()))
        out.append(
            Workload(
                id=f"{id_prefix}-{i:04d}-{_MODEL_SLUG[model]}-{trace}",
                tenant=tenants[int(u_tenant[i] * len(tenants))] if tenants else "",
                priority=2,
                weight=1.0,
                inference=InferenceSpec(
                    gpus_per_replica=gpr,
                    replica_rps=rps,
                    target_rps=target,
                    min_replicas=2,
                    max_replicas=max(2, max_useful),
                    cpus_per_replica=8.0 * min_tp,
                    memory_gib_per_replica=48.0 * min_tp,
                    spread=spread,
                ),
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------- tenants and problems


def make_tenants(n: int, nodes: Sequence[Node], seed: int = 0) -> tuple[Tenant, ...]:
    """``team-0`` ... ``team-<n-1>`` with seeded weights and quotas (see the module docstring)."""
    rng = _rng(seed, 4)
    total = sum(node.gpus for node in nodes)
    h100 = sum(node.gpus for node in nodes if node.gpu_type == "h100")
    weights = rng.integers(1, 4, size=n)
    shares = rng.uniform(0.2, 0.5, size=n)
    capped = rng.random(n) < 0.5
    out: list[Tenant] = []
    for i in range(n):
        per_type = {"h100": max(1, math.ceil(0.25 * h100))} if capped[i] and h100 else {}
        out.append(
            Tenant(
                name=f"team-{i}",
                max_gpus=max(1, math.ceil(float(shares[i]) * total)),
                max_gpus_per_type=per_type,
                weight=float(weights[i]),
            )
        )
    return tuple(out)


def problem(
    n_workloads: int,
    n_nodes: int,
    seed: int = 0,
    inference_fraction: float = 0.05,
    *,
    n_tenants: int = 6,
    data: PathArg = None,
    zones: int | None = None,
) -> Problem:
    """A fresh planning problem: ``n_nodes`` nodes and ``n_workloads`` workloads.

    ``round(n_workloads * inference_fraction)`` of them are inference services,
    the rest training jobs; ``n_tenants`` tenants with quotas.
    """
    if not 0.0 <= inference_fraction <= 1.0:
        raise ValueError("inference_fraction must be in [0, 1]")
    path = data_dir(data)
    nodes = inventory(n_nodes, seed, data=path, zones=zones)
    tenants = make_tenants(n_tenants, nodes, seed)
    names = [t.name for t in tenants]
    n_inf = round(n_workloads * inference_fraction)
    train = training_jobs(n_workloads - n_inf, seed, tenants=names, data=path)
    services = inference_services(n_inf, seed, tenants=names, data=path)
    return Problem(
        gpu_types=gpu_types(),
        nodes=nodes,
        workloads=train + services,
        tenants=tenants,
    )


# Gavel's physical cluster: 48 GPUs = 8 V100 + 16 P100 + 24 K80 (data README),
# workers of 4 GPUs each (Gavel's PHYSICAL_CLUSTER.md launches `worker.py -g 4`).
# CPUs and memory of those servers are not in the data; we use the public shapes
# of Azure's 4-GPU sizes of the same GPU models (NC24: 4 K80, 24 vCPUs,
# 224 GiB; NC24s_v2: 4 P100, 24 vCPUs, 448 GiB; NC24s_v3: 4 V100, 24 vCPUs,
# 448 GiB), not a claim about Gavel's machines. Gavel schedules GPUs only, so
# the jobs ask for no CPUs or host memory. One zone, one rack per GPU type.
GAVEL_CLUSTER: dict[str, tuple[int, int, float, float]] = {
    # type: (nodes, gpus per node, cpus, memory_gib)
    "v100": (2, 4, 24.0, 448.0),
    "p100": (4, 4, 24.0, 448.0),
    "k80": (6, 4, 24.0, 224.0),
}


def gavel_problem(
    trace_name: str = "artifact_evaluation.trace",
    *,
    data: PathArg = None,
    throughputs_file: str = "physical_cluster_throughputs.json",
) -> Problem:
    """A Gavel physical-cluster trace on Gavel's 48-GPU cluster, with its measured throughputs.

    One job per trace line: ``scale_factor`` GPUs, throughput per type from
    ``throughputs_file`` (0 = does not run: left out), ``remaining_work`` =
    ``total_steps``, ``weight`` = ``priority_weight``, ``submit_time_s`` =
    ``arrival_time``; an SLO > 0 becomes a deadline of SLO x the job's run
    time on its fastest type (all shipped traces have SLO -1: none). Locality
    ``node`` up to 4 GPUs (one server), else ``domain`` (one type's rack).
    """
    path = data_dir(data)
    table = _gavel_table(path, throughputs_file)
    nodes: list[Node] = []
    for gpu_type, (count, gpus, cpus, mem) in GAVEL_CLUSTER.items():
        for k in range(count):
            nodes.append(
                Node(
                    id=f"{gpu_type}-{k}",
                    gpu_type=gpu_type,
                    gpus=gpus,
                    cpus=cpus,
                    memory_gib=mem,
                    zone="gavel",
                    domain=f"rack-{gpu_type}",
                )
            )
    jobs: list[Workload] = []
    lines = (path / "gavel" / "traces" / "physical_cluster" / trace_name).read_text().splitlines()
    for idx, line in enumerate(x for x in lines if x.strip()):
        cols = line.split("\t")
        job_type, total_steps, scale, prio_w, slo, arrival = (
            cols[0],
            int(cols[5]),
            int(cols[6]),
            float(cols[7]),
            float(cols[8]),
            float(cols[9]),
        )
        thr = table[(job_type, scale)]
        deadline = slo * total_steps / max(thr.values()) if slo > 0 else None
        jobs.append(
            Workload(
                id=f"job-{idx:03d}-{gavel_slug(job_type)}",
                weight=prio_w,
                submit_time_s=arrival,
                training=TrainingSpec(
                    shapes=(GangShape(scale, dict(thr)),),
                    gpu_memory_gib=gavel_gpu_memory_gib(job_type),
                    locality=Locality.NODE if scale <= 4 else Locality.DOMAIN,
                    remaining_work=float(total_steps),
                    deadline_s=deadline,
                ),
            )
        )
    return Problem(gpu_types=gpu_types(GAVEL_TYPES), nodes=tuple(nodes), workloads=tuple(jobs))


def summary(p: Problem) -> Mapping[str, object]:
    """Counts that describe an instance (for benchmark records)."""
    gpus: dict[str, int] = {}
    for node in p.nodes:
        gpus[node.gpu_type] = gpus.get(node.gpu_type, 0) + node.gpus
    return {
        "nodes": len(p.nodes),
        "gpus": sum(gpus.values()),
        "gpus_per_type": gpus,
        "zones": len({n.zone for n in p.nodes}),
        "domains": len({n.domain for n in p.nodes}),
        "training_jobs": sum(1 for w in p.workloads if w.training is not None),
        "elastic_jobs": sum(1 for w in p.workloads if w.training is not None and len(w.training.shapes) > 1),
        "inference_services": sum(1 for w in p.workloads if w.inference is not None),
        "tenants": len(p.tenants),
    }
