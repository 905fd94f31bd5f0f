"""Input files for the conversion and CLI tests: the example of DESIGN.md,
made valid (its `product` tenant is declared) and small enough to plan in well
under a second."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

INVENTORY_YAML = """\
gpu_types:
  - {name: h100-80g, memory_gib: 80, cost_per_hour: 4.0}
  - {name: a100-40g, memory_gib: 40, cost_per_hour: 1.8}
nodes:
  - {id: n1, gpu_type: h100-80g, gpus: 8, cpus: 96, memory_gib: 1024, zone: z1, domain: rack1}
  - {id: n2, gpu_type: h100-80g, gpus: 8, cpus: 96, memory_gib: 1024, zone: z1, domain: rack1,
     labels: {pool: batch}}
  - {id: n3, gpu_type: a100-40g, gpus: 8, cpus: 64, memory_gib: 512, zone: z2, domain: rack2, state: draining}
tenants:
  - {name: research, max_gpus: 64, max_gpus_per_type: {h100-80g: 16}}
  - {name: product, weight: 2}
"""

WORKLOADS_YAML = """\
workloads:
  - id: llm-pretrain
    tenant: research
    priority: 10
    training:
      gpus: 16
      gpu_memory_gib: 60
      locality: domain
      throughput: {h100-80g: 3.1, a100-40g: 1.0}
      remaining_work: 200000
  - id: chat
    tenant: product
    inference:
      gpus_per_replica: {h100-80g: 1, a100-40g: 2}
      replica_rps: {h100-80g: 14, a100-40g: 9}
      target_rps: 100
      min_replicas: 2
      spread: zone
  - id: finetune
    tenant: research
    weight: 0.5
    allowed_gpu_types: [h100-80g]
    node_selector: {pool: batch}
    submit_time_s: 12
    training:
      elastic:
        - {gpus: 2, throughput: {h100-80g: 1.0}}
        - {gpus: 4, throughput: {h100-80g: 1.8}}
      preemptible: false
      deadline_s: 3600
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write(name, text) -> path of a new file in the test's temporary directory."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def inventory_file(write: Callable[[str, str], Path]) -> Path:
    return write("inventory.yaml", INVENTORY_YAML)


@pytest.fixture
def workloads_file(write: Callable[[str, str], Path]) -> Path:
    return write("workloads.yaml", WORKLOADS_YAML)
