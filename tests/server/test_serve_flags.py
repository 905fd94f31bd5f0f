"""``apportion serve``'s options reach the server's configuration: the workers'
heartbeats, restarts and stops, and the control loop's throughput feedback."""

from __future__ import annotations

import pytest

from server.app import ServerConfig
from server.cli import UsageError, build_parser, serve_config
from server.control import LoopConfig
from server.workers import WorkersConfig
from solver import ValidationError


def config_of(*argv: str) -> ServerConfig:
    return serve_config(build_parser().parse_args(["serve", "--insecure", *argv]))


def test_the_defaults_are_the_configs_defaults() -> None:
    config = config_of()
    assert config.workers == WorkersConfig()
    assert config.loop.throughput_feedback == LoopConfig().throughput_feedback == "observed"
    # rate limiting is on unless asked off (hardening: it was off by default)
    assert config.rate_limit == ServerConfig.rate_limit == 2000.0 and config.rate_burst == 4000
    assert config_of("--rate-limit", "0").rate_limit == 0.0
    assert config_of("--plan-processes", "3").plan_processes == 3
    # new work is admitted into free capacity between rounds unless asked off
    assert config.admission.enabled and not config_of("--admission", "off").admission.enabled


def test_worker_and_feedback_flags_reach_the_config() -> None:
    config = config_of(
        "--heartbeat-interval", "0.5", "--heartbeat-timeout", "4", "--max-restarts", "7",
        "--restart-backoff", "0.25", "--stop-grace", "3", "--throughput-feedback", "scaled",
    )  # fmt: skip
    w = config.workers
    assert (w.heartbeat_interval_s, w.heartbeat_timeout_s, w.max_restarts, w.restart_backoff_s) == (
        0.5,
        4.0,
        7,
        0.25,
    )
    assert w.stop_grace_s == 3.0
    assert config.loop.throughput_feedback == "scaled"
    assert config_of("--max-restarts", "0").workers.max_restarts == 0  # the first crash fails it


def test_bad_worker_flags_are_refused() -> None:
    with pytest.raises(ValidationError, match="--heartbeat-timeout"):
        config_of("--heartbeat-interval", "5", "--heartbeat-timeout", "5")
    for bad in (["--max-restarts", "-1"], ["--restart-backoff", "0"], ["--throughput-feedback", "on"]):
        with pytest.raises(UsageError):
            config_of(*bad)
