"""bench.instances and bench.gavel_lp: determinism, sizes, provenance, and the LP's known optima.

Provenance checks re-read the data files here, independently of the module, and
compare every number an instance or example carries with its source.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import instances as inst
from bench.gavel_lp import max_min_allocation, max_min_lp
from solver.model import (
    GangShape,
    GpuType,
    Locality,
    Node,
    NodeState,
    Problem,
    Tenant,
    TrainingSpec,
    Workload,
)

DATA = inst.DEFAULT_DATA_DIR
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def gavel_json(file: str = "simulation_throughputs.json") -> dict[tuple[str, int], dict[str, float]]:
    raw = json.loads((DATA / "gavel" / file).read_text())
    out: dict[tuple[str, int], dict[str, float]] = {}
    for gpu in ("k80", "p100", "v100"):
        for key, entry in raw[gpu].items():
            job, count = ast.literal_eval(key)
            out.setdefault((job, count), {})[gpu] = entry["null"]
    return out


def job_type_of(w: Workload) -> str:
    """Generated ids end in the Gavel slug: ``train-00012-resnet-18-bs64``."""
    return inst.gavel_job_type(w.id.split("-", 2)[2])


def rel_close(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=0.0)


# ---------------------------------------------------------------------------
# data location and GPU types


def test_data_dir_default_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(inst.DATA_ENV, raising=False)
    assert inst.data_dir() == DATA
    assert Path(inst.__file__).resolve().parents[1] / "data" == DATA  # the repository's copy
    monkeypatch.setenv(inst.DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=inst.DATA_ENV):
        inst.data_dir()
    assert inst.data_dir(DATA) == DATA  # an argument wins over the environment
    monkeypatch.setenv(inst.DATA_ENV, str(DATA))
    assert inst.data_dir() == DATA


def test_gpu_types_cover_every_type_with_throughput_data() -> None:
    types = {t.name: t for t in inst.gpu_types()}
    assert set(types) == set(inst.TRAINING_TYPES) | set(inst.INFERENCE_TYPES)
    assert types["k80"].memory_gib == 12 and types["v100"].memory_gib == 16
    assert types["v100m32"].memory_gib == 32 and types["h200"].memory_gib == 141
    assert all(t.cost_per_hour is not None and t.cost_per_hour > 0 for t in types.values())
    assert [t.name for t in inst.gpu_types(["v100", "k80"])] == ["v100", "k80"]
    with pytest.raises(ValueError, match="unknown GPU types"):
        inst.gpu_types(["tpu"])


# ---------------------------------------------------------------------------
# inventory


def pai_counts() -> Counter[str]:
    header = (DATA / "alibaba_pai_v2020" / "pai_machine_spec.header").read_text().strip().split(",")
    with (DATA / "alibaba_pai_v2020" / "pai_machine_spec.csv").open(newline="") as f:
        rows = list(csv.DictReader(f, fieldnames=header))
    return Counter(r["gpu_type"] for r in rows if int(r["cap_gpu"]) > 0)


def test_inventory_is_deterministic_and_sized() -> None:
    a = inst.inventory(250, seed=3)
    assert a == inst.inventory(250, seed=3)
    assert len(a) == 250
    assert len({n.id for n in a}) == 250
    assert inst.inventory(0) == ()
    assert len(inst.inventory(1)) == 1


def test_inventory_keeps_the_pai_machine_mix_and_shapes() -> None:
    pai = pai_counts()
    nodes = inst.inventory(sum(pai.values()), seed=0)  # the whole table: exact counts
    got = Counter(n.labels["pai_gpu_type"] for n in nodes)
    assert got == pai
    assert Counter(n.gpu_type for n in nodes if n.labels["pai_gpu_type"] == "MISC") == {
        t: pai["MISC"] // 4 for t in inst.INFERENCE_TYPES
    }
    shapes = {(n.labels["pai_gpu_type"], n.gpus, n.cpus, n.memory_gib) for n in nodes}
    assert ("P100", 2, 64.0, 512.0) in shapes and ("V100M32", 8, 96.0, 384.0) in shapes
    mapping = {n.labels["pai_gpu_type"]: n.gpu_type for n in nodes if n.labels["pai_gpu_type"] != "MISC"}
    assert mapping == {"P100": "p100", "T4": "k80", "V100": "v100", "V100M32": "v100m32"}
    # a sample keeps the mix to within one node per machine shape
    small = inst.inventory(300, seed=5)
    for pai_type, count in pai.items():
        share = sum(1 for n in small if n.labels["pai_gpu_type"] == pai_type)
        assert abs(share - count / sum(pai.values()) * 300) <= 2


def test_inventory_topology_rules() -> None:
    nodes = inst.inventory(1000, seed=1)
    assert {n.zone for n in nodes} == {"zone-a", "zone-b", "zone-c"}
    assert all(n.state is NodeState.READY for n in nodes)
    racks: dict[str, list[Node]] = {}
    for n in nodes:
        racks.setdefault(n.domain, []).append(n)
    for members in racks.values():
        assert len({(m.gpu_type, m.zone) for m in members}) == 1  # one type, one zone per rack
        assert len(members) <= (16 if members[0].gpus == 8 else 32)
    for t in {n.gpu_type for n in nodes}:  # every type in every zone
        assert {n.zone for n in nodes if n.gpu_type == t} == {"zone-a", "zone-b", "zone-c"}
    assert {n.zone for n in inst.inventory(20)} == {"zone-a", "zone-b"}
    assert {n.gpu_type for n in inst.inventory(100, llm_partition=False)} <= set(inst.TRAINING_TYPES)


# ---------------------------------------------------------------------------
# training jobs


def test_training_jobs_are_deterministic_and_sized() -> None:
    a = inst.training_jobs(400, seed=7)
    assert a == inst.training_jobs(400, seed=7)
    assert a != inst.training_jobs(400, seed=8)
    assert len(a) == 400 and len({w.id for w in a}) == 400
    assert all(w.training is not None and w.inference is None for w in a)
    assert inst.training_jobs(0) == ()


def test_training_throughputs_are_gavels_numbers() -> None:
    table = gavel_json()
    # the example the brief names: a V100 ResNet-18 number equals the JSON value
    raw = json.loads((DATA / "gavel" / "simulation_throughputs.json").read_text())
    r18 = raw["v100"]["('ResNet-18 (batch size 64)', 1)"]["null"]
    assert inst.gavel_throughputs()[("ResNet-18 (batch size 64)", 1)]["v100"] == r18

    jobs = inst.training_jobs(1500, seed=2)
    seen_counts: set[int] = set()
    for w in jobs:
        assert w.training is not None
        job = job_type_of(w)
        for shape in w.training.shapes:
            seen_counts.add(shape.gpus)
            if shape.gpus > 8:
                continue
            source = table[(job, shape.gpus)]
            for t in ("k80", "p100", "v100"):
                if source[t] > 0:
                    assert shape.throughput[t] == source[t], (w.id, t)
                else:  # Gavel's 0 = does not run: left out
                    assert t not in shape.throughput
            assert shape.throughput["v100m32"] == source["v100"]
    assert {1, 2, 4, 8, 16} <= seen_counts


def test_large_gangs_extrapolate_with_the_measured_scaling_efficiency() -> None:
    table = gavel_json()
    jobs = [w for w in inst.training_jobs(3000, seed=4) if w.training and w.training.shapes[-1].gpus >= 16]
    assert jobs
    for w in jobs:
        assert w.training is not None
        job = job_type_of(w)
        by_count = {s.gpus: s.throughput for s in w.training.shapes}
        for count, thr in by_count.items():
            if count < 16:
                continue
            for t, value in thr.items():
                g = "v100" if t == "v100m32" else t
                eff = min(1.0, table[(job, 8)][g] / (2 * table[(job, 4)][g]))
                expected = table[(job, 8)][g] * (2 * eff) ** {16: 1, 32: 2}[count]
                assert rel_close(value, expected), (w.id, count, t)
        assert w.training.locality is Locality.DOMAIN


def test_training_work_comes_from_philly_durations_and_v100_throughput() -> None:
    durations: dict[int, set[float]] = {}
    with (DATA / "pollux_osdi21" / "philly.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            if r.get("num_gpus") and r.get("duration"):
                durations.setdefault(int(r["num_gpus"]), set()).add(float(r["duration"]))
    jobs = inst.training_jobs(500, seed=11)
    counts: Counter[int] = Counter()
    for w in jobs:
        spec = w.training
        assert spec is not None and spec.remaining_work is not None
        work = spec.remaining_work
        # the drawn Philly job is one of the shapes (the only one unless elastic)
        matches = [
            (s.gpus, work / s.throughput["v100"])
            for s in spec.shapes
            if any(rel_close(work / s.throughput["v100"], d) for d in durations.get(s.gpus, ()))
        ]
        assert matches, w.id
        g, duration = matches[0]
        counts[g] += 1
        if spec.deadline_s is not None:
            assert 1.5 * duration - 1e-6 <= spec.deadline_s <= 3.0 * duration + 1e-6
    assert counts[1] > 0.8 * len(jobs)  # Philly is mostly 1-GPU jobs


def test_training_job_attributes_follow_the_stated_rules() -> None:
    jobs = inst.training_jobs(2000, seed=5)
    elastic = [w for w in jobs if w.training and len(w.training.shapes) > 1]
    assert 0.05 * len(jobs) < len(elastic) < 0.25 * len(jobs)
    for w in jobs:
        spec = w.training
        assert spec is not None
        counts = [s.gpus for s in spec.shapes]
        assert counts == sorted(counts)
        assert spec.locality is (Locality.NODE if counts[-1] <= 2 else Locality.DOMAIN)
        assert w.priority in (0, 1, 2) and w.tenant in inst.DEFAULT_TENANTS
        assert spec.gpu_memory_gib == inst.gavel_gpu_memory_gib(job_type_of(w))
    assert Counter(w.priority for w in jobs)[0] > Counter(w.priority for w in jobs)[2]
    only_k80 = inst.training_jobs(200, seed=1, types=["k80"])
    assert all(set(s.throughput) == {"k80"} for w in only_k80 if w.training for s in w.training.shapes)
    with pytest.raises(ValueError, match="no training throughput"):
        inst.training_jobs(1, types=["h100"])


def test_gpu_memory_estimates_match_the_k80_fact_in_the_data() -> None:
    physical = gavel_json("physical_cluster_throughputs.json")
    for (job, _), thr in gavel_json().items():
        mem = inst.gavel_gpu_memory_gib(job)
        if job == "ResNet-50 (batch size 128)":
            assert 12 < mem <= 16  # out of memory on K80 (12 GiB), runs on P100/V100 (16 GiB)
            assert all(v == 0 for (j, _), t in physical.items() if j == job for v in [t["k80"]])
        else:
            assert 0 < mem < 12 and thr["k80"] > 0


# ---------------------------------------------------------------------------
# inference services


def trtllm_table() -> list[dict[str, str]]:
    with (DATA / "trtllm_perf" / "trtllm_v0.9.0_peak_throughput.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def mean_generated(trace: str) -> float:
    with (DATA / "azure_llm_2023" / f"AzureLLMInferenceTrace_{trace}.csv").open(newline="") as f:
        gen = [int(r["GeneratedTokens"]) for r in csv.DictReader(f)]
    return sum(gen) / len(gen)


def test_azure_stats() -> None:
    stats = inst.azure_trace_stats()
    assert stats["code"].requests == 8819 and stats["conv"].requests == 19366
    assert rel_close(stats["code"].mean_generated_tokens, mean_generated("code"))
    assert 2.5 < stats["code"].mean_rps < 2.6 and 5.5 < stats["conv"].mean_rps < 5.6


def test_inference_services_are_deterministic_sized_and_traceable() -> None:
    services = inst.inference_services(60, seed=9)
    assert services == inst.inference_services(60, seed=9)
    assert len(services) == 60 and len({w.id for w in services}) == 60
    rows = [r for r in trtllm_table() if r["input_len"] == "2048" and r["output_len"] == "128"]
    gen = {t: mean_generated(t) for t in ("code", "conv")}
    stats = inst.azure_trace_stats()
    slug_to_model = {
        "llama-70b": "LLaMA 70B",
        "llama-7b": "LLaMA 7B",
        "gptj-6b": "GPT-J 6B",
        "mistral-7b": "Mistral 7B",
        "mixtral-8x7b": "Mixtral 8x7B",
        "falcon-180b": "Falcon 180B",
    }
    for w in services:
        spec = w.inference
        assert spec is not None and w.training is None
        _, _, rest = w.id.split("-", 2)
        model_slug, trace = rest.rsplit("-", 1)
        model = slug_to_model[model_slug]
        assert set(spec.gpus_per_replica) == set(inst.INFERENCE_TYPES)
        for r in rows:
            if r["model"] != model:
                continue
            t = r["gpu"].lower()
            assert spec.gpus_per_replica[t] == int(r["tp"])
            expected = float(r["throughput_out_tok_per_s_per_gpu"]) * int(r["tp"]) / gen[trace]
            assert rel_close(spec.replica_rps[t], expected), (w.id, t)
        mean = stats[trace].mean_rps
        assert mean * (1 - 1e-9) <= spec.target_rps <= 16 * mean * (1 + 1e-9)
        assert spec.min_replicas == 2
        assert spec.max_replicas == max(2, math.ceil(spec.target_rps / min(spec.replica_rps.values())))
    only_h100 = inst.inference_services(10, seed=1, types=["h100"])
    assert len(only_h100) == 10
    assert all(w.inference and set(w.inference.replica_rps) == {"h100"} for w in only_h100)


# ---------------------------------------------------------------------------
# whole problems


def check_consistent(p: Problem) -> None:
    types = {t.name for t in p.gpu_types}
    tenants = {t.name for t in p.tenants}
    assert {n.gpu_type for n in p.nodes} <= types
    for w in p.workloads:
        assert not w.tenant or w.tenant in tenants
        if w.training is not None:
            assert all(set(s.throughput) <= types for s in w.training.shapes)
        if w.inference is not None:
            assert set(w.inference.replica_rps) <= types


def test_problem_is_deterministic_sized_and_consistent() -> None:
    p = inst.problem(300, 60, seed=0)
    assert p == inst.problem(300, 60, seed=0)
    assert len(p.nodes) == 60 and len(p.workloads) == 300
    assert sum(1 for w in p.workloads if w.inference is not None) == 15
    assert len({w.id for w in p.workloads}) == 300
    check_consistent(p)
    total = sum(n.gpus for n in p.nodes)
    for t in p.tenants:
        assert t.max_gpus is not None and 0.2 * total <= t.max_gpus <= 0.5 * total + 1
    q = inst.problem(300, 60, seed=0, inference_fraction=0.5, n_tenants=2)
    assert sum(1 for w in q.workloads if w.inference is not None) == 150 and len(q.tenants) == 2


def test_problem_at_benchmark_scale() -> None:
    # 10,000 workloads on 4,000 nodes builds in about 1 s here (0.2 s once the data is cached).
    p = inst.problem(10_000, 4_000, seed=1)
    assert len(p.workloads) == 10_000 and len(p.nodes) == 4_000
    check_consistent(p)


def test_gavel_problem_matches_the_trace_and_cluster() -> None:
    p = inst.gavel_problem("artifact_evaluation.trace")
    gpus = Counter[str]()
    for n in p.nodes:
        gpus[n.gpu_type] += n.gpus
        assert n.gpus == 4
    assert gpus == {"v100": 8, "p100": 16, "k80": 24}
    physical = gavel_json("physical_cluster_throughputs.json")
    lines = (DATA / "gavel/traces/physical_cluster/artifact_evaluation.trace").read_text().splitlines()
    assert len(p.workloads) == len(lines) == 15
    for w, line in zip(p.workloads, lines, strict=True):
        cols = line.split("\t")
        assert w.training is not None
        (shape,) = w.training.shapes
        assert shape.gpus == int(cols[6])
        assert w.training.remaining_work == int(cols[5])
        assert w.weight == float(cols[7]) and w.submit_time_s == float(cols[9])
        assert shape.throughput == {t: v for t, v in physical[(cols[0], int(cols[6]))].items() if v > 0}
    check_consistent(p)
    for name in ("small_test.trace", "max_min_fairness.trace", "minimize_makespan.trace"):
        check_consistent(inst.gavel_problem(name))


# ---------------------------------------------------------------------------
# Gavel's max-min fairness LP


def tiny(jobs: list[tuple[str, int, dict[str, float], float]], gpus: dict[str, int]) -> Problem:
    """jobs: (id, scale factor, throughput per type, weight); one node per type."""
    return Problem(
        gpu_types=tuple(GpuType(t, 16) for t in gpus),
        nodes=tuple(Node(f"n-{t}", t, g) for t, g in gpus.items()),
        workloads=tuple(
            Workload(id=i, weight=w, training=TrainingSpec(shapes=(GangShape(sf, thr),)))
            for i, sf, thr, w in jobs
        ),
    )


def test_lp_heterogeneous_known_optimum() -> None:
    # Types A and B with 1 GPU each. j1 runs 4x faster on A (rho = 1 on A, 0.25
    # on B); j2 and j3 run equally on both (rho = 1, 1). Summing the three
    # fairness rows: 3z <= a1 + b1/4 + a2 + b2 + a3 + b3 <= (a1+a2+a3) + (b1+b2+b3)
    # <= 2, so z <= 2/3; and z = 2/3 is reached by j1 on A for 2/3 of the time
    # and j2, j3 sharing A's remaining 1/3 and B: (a2, b2) = (1/3, 1/3), b3 = 2/3.
    p = tiny(
        [
            ("j1", 1, {"A": 4.0, "B": 1.0}, 1.0),
            ("j2", 1, {"A": 2.0, "B": 2.0}, 1.0),
            ("j3", 1, {"A": 2.0, "B": 2.0}, 1.0),
        ],
        {"A": 1, "B": 1},
    )
    assert max_min_lp(p) == pytest.approx(2 / 3, abs=1e-9)
    alloc = max_min_allocation(p).allocation
    assert alloc["j1"].get("B", 0.0) == pytest.approx(0.0, abs=1e-9)  # B is wasted on j1


def test_lp_scale_factor_and_weights() -> None:
    # One type with 2 GPUs: j1 needs 2 GPUs, j2 one. 2 x1 + x2 <= 2 and
    # max min(x1, x2) gives x1 = x2 = 2/3.
    p = tiny([("j1", 2, {"A": 1.0}, 1.0), ("j2", 1, {"A": 5.0}, 1.0)], {"A": 2})
    assert max_min_lp(p) == pytest.approx(2 / 3, abs=1e-9)
    # One GPU, weights 1 and 2: max min(x1 / 1, x2 / 2) with x1 + x2 <= 1 gives
    # x1 = 1/3, x2 = 2/3 and the objective 1/3.
    q = tiny([("j1", 1, {"A": 1.0}, 1.0), ("j2", 1, {"A": 1.0}, 2.0)], {"A": 1})
    assert max_min_lp(q) == pytest.approx(1 / 3, abs=1e-9)
    alloc = max_min_allocation(q).allocation
    assert alloc["j2"]["A"] == pytest.approx(2 / 3, abs=1e-9)


def test_lp_reads_tenants_memory_and_node_state() -> None:
    base = tiny([("j1", 1, {"A": 1.0}, 1.0), ("j2", 1, {"A": 1.0}, 1.0)], {"A": 1})
    # tenant weight 3 on j2: x1 + x2 <= 1, min(x1, x2 / 3) -> x1 = 1/4
    weighted = Problem(
        gpu_types=base.gpu_types,
        nodes=base.nodes,
        workloads=(base.workloads[0], dataclasses.replace(base.workloads[1], tenant="t")),
        tenants=(Tenant("t", weight=3.0),),
    )
    assert max_min_lp(weighted) == pytest.approx(1 / 4, abs=1e-9)
    # a job that fits no type is excluded, not pinned to 0
    big = Workload(id="big", training=TrainingSpec(shapes=(GangShape(1, {"A": 1.0}),), gpu_memory_gib=40))
    r = max_min_allocation(Problem(base.gpu_types, base.nodes, (*base.workloads, big)))
    assert r.excluded == ("big",) and r.value == pytest.approx(0.5)
    # draining nodes contribute no GPUs
    drained = Problem(base.gpu_types, (Node("n-A", "A", 1, state=NodeState.DRAINING),), base.workloads)
    with pytest.raises(ValueError, match="no training job"):
        max_min_lp(drained)


def test_lp_on_gavel_trace_respects_its_constraints() -> None:
    p = inst.gavel_problem("max_min_fairness.trace")
    r = max_min_allocation(p)
    assert 0 < r.value <= 1 and not r.excluded
    gpus = {"v100": 8, "p100": 16, "k80": 24}
    use = dict.fromkeys(gpus, 0.0)
    for w in p.workloads:
        assert w.training is not None
        x = r.allocation.get(w.id, {})
        assert sum(x.values()) <= 1 + 1e-7
        thr = w.training.shapes[0].throughput
        assert sum(thr[t] / max(thr.values()) * v for t, v in x.items()) / w.weight >= r.value - 1e-7
        for t, v in x.items():
            use[t] += v * w.training.shapes[0].gpus
    assert all(use[t] <= gpus[t] + 1e-6 for t in gpus)


# ---------------------------------------------------------------------------
# the examples


# example id -> the Gavel job type its throughputs come from
EXAMPLE_JOB_TYPES = {
    "resnet18-cifar": "ResNet-18 (batch size 64)",
    "resnet18-bs128": "ResNet-18 (batch size 128)",
    "resnet50-bs128": "ResNet-50 (batch size 128)",
    "resnet50-imagenet": "ResNet-50 (batch size 64)",
    "transformer-elastic": "Transformer (batch size 64)",
    "lm-wikitext": "LM (batch size 20)",
    "resnet50-16gpu": "ResNet-50 (batch size 64)",
    "recommender": "Recommendation (batch size 8192)",
    "a3c-pong": "A3C",
    "cyclegan": "CycleGAN",
    "transformer-bs256": "Transformer (batch size 256)",
    "lm-elastic": "LM (batch size 5)",
    "interns-sweep": "ResNet-18 (batch size 32)",
    "pretrain-64": "LM (batch size 40)",
    "transformer-deadline": "Transformer (batch size 32)",
    "resnet18-pinned": "ResNet-18 (batch size 256)",
}
EXAMPLE_SERVICES = {
    "chat-llama70b": ("LLaMA 70B", "conv"),
    "code-llama7b": ("LLaMA 7B", "code"),
    "chat-mixtral": ("Mixtral 8x7B", "conv"),
}


def load_examples() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    inventory = yaml.safe_load((EXAMPLES / "inventory.yaml").read_text())
    workloads = yaml.safe_load((EXAMPLES / "workloads.yaml").read_text())["workloads"]
    return inventory, workloads


def test_example_numbers_trace_to_the_data() -> None:
    inventory, workloads = load_examples()
    table = gavel_json()
    assert {w["id"] for w in workloads} == set(EXAMPLE_JOB_TYPES) | set(EXAMPLE_SERVICES)
    for w in workloads:
        if "training" in w:
            job = EXAMPLE_JOB_TYPES[w["id"]]
            spec = w["training"]
            shapes = spec.get("elastic") or [{"gpus": spec["gpus"], "throughput": spec["throughput"]}]
            for s in shapes:
                g = s["gpus"]
                for t, value in s["throughput"].items():
                    if g <= 8:
                        expected = table[(job, g)][t]
                    else:  # doubling from 8 with the measured 4->8 efficiency, capped at 1
                        eff = min(1.0, table[(job, 8)][t] / (2 * table[(job, 4)][t]))
                        expected = table[(job, 8)][t] * (2 * eff) ** round(math.log2(g / 8))
                    assert rel_close(value, expected, 1e-5), (w["id"], g, t)
            assert spec["gpu_memory_gib"] == inst.gavel_gpu_memory_gib(job)
        else:
            model, trace = EXAMPLE_SERVICES[w["id"]]
            gpr, rps = inst.service_capacity(model, trace, ("a100", "h100"))
            assert w["inference"]["gpus_per_replica"] == gpr
            for t, value in w["inference"]["replica_rps"].items():
                assert rel_close(value, rps[t], 1e-5), (w["id"], t)
    prices = {t.name: t for t in inst.gpu_types()}
    for t in inventory["gpu_types"]:
        assert t["memory_gib"] == prices[t["name"]].memory_gib
        assert t["cost_per_hour"] == prices[t["name"]].cost_per_hour


def test_examples_show_what_they_claim() -> None:
    inventory, workloads = load_examples()
    types = {t["name"]: t for t in inventory["gpu_types"]}
    nodes = inventory["nodes"]
    assert 12 <= len(nodes) <= 24 and {"h100", "a100"} <= set(types)
    assert len({n["zone"] for n in nodes}) == 2 and len({n["domain"] for n in nodes}) == 4
    by_id = {w["id"]: w for w in workloads}
    for w in workloads:  # only known GPU types are referenced
        spec = w.get("training") or w["inference"]
        keys = set(spec.get("throughput", {})) | set(spec.get("replica_rps", {}))
        for s in spec.get("elastic", []):
            keys |= set(s["throughput"])
        assert keys <= set(types), w["id"]
    assert any("elastic" in w.get("training", {}) for w in workloads)
    # a multi-node gang in one rack
    big = by_id["resnet50-16gpu"]["training"]
    assert big["locality"] == "domain" and big["gpus"] > max(n["gpus"] for n in nodes)
    # needs more GPU memory than the smallest type has
    smallest = min(t["memory_gib"] for t in types.values())
    assert by_id["resnet50-bs128"]["training"]["gpu_memory_gib"] > smallest
    services = [w for w in workloads if "inference" in w]
    assert 2 <= len(services) <= 3 and any(s["inference"]["spread"] == "zone" for s in services)
    # cannot be placed: larger than all V100s; over the tenant's quota
    v100 = sum(n["gpus"] for n in nodes if n["gpu_type"] == "v100")
    assert by_id["pretrain-64"]["training"]["gpus"] > v100
    assert set(by_id["pretrain-64"]["training"]["throughput"]) == {"v100"}
    quota = {t["name"]: t["max_gpus"] for t in inventory["tenants"]}
    assert by_id["interns-sweep"]["training"]["gpus"] > quota["interns"]
