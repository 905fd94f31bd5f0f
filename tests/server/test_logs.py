"""server.logs: JSON lines and text, extras, idempotent configure, the root logger left alone."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from server import logs


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """Leave the 'apportion' logger as the test found it."""
    logger = logging.getLogger(logs.LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    log = logs.get_logger("server")
    log.info(
        "rpc %s",
        "done",
        extra={
            "method": "SubmitWorkload",
            "code": "OK",
            "principal": "tenant:a#0123abcd",
            "duration_ms": 1.5,
        },
    )
    log.debug("hidden at INFO")
    (line,) = lines(out)
    record = json.loads(line)
    assert RFC3339_UTC.match(record.pop("ts"))
    assert record == {
        "level": "INFO",
        "logger": "apportion.server",
        "msg": "rpc done",
        "method": "SubmitWorkload",
        "code": "OK",
        "principal": "tenant:a#0123abcd",
        "duration_ms": 1.5,
    }


def test_json_odd_values_and_exceptions() -> None:
    out = io.StringIO()
    logs.configure("debug", stream=out)
    log = logs.get_logger()
    log.debug("odd", extra={"workload_id": "w1", "obj": {1, 2} - {1}, "ts": "mine", "text": "ünïcode"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", extra={"workload_id": "w2"})
    first, second = (json.loads(line) for line in lines(out))
    assert first["logger"] == "apportion" and first["level"] == "DEBUG"
    assert first["obj"] == "{2}"  # not JSON: str()
    assert first["extra.ts"] == "mine" and RFC3339_UTC.match(first["ts"])  # base fields win
    assert first["text"] == "ünïcode"
    assert second["level"] == "ERROR" and second["workload_id"] == "w2"
    assert "RuntimeError: boom" in second["exc"] and "Traceback" in second["exc"]


def test_text() -> None:
    out = io.StringIO()
    logs.configure("INFO", fmt="text", stream=out)
    logs.get_logger("loop").warning("replanned", extra={"gap": 0.01, "reason": "node n1 drained", "n": 3})
    (line,) = lines(out)
    ts, rest = line.split(" ", 1)
    assert RFC3339_UTC.match(ts)
    assert rest == 'WARNING apportion.loop: replanned gap=0.01 reason="node n1 drained" n=3'


def test_configure_is_idempotent_and_leaves_root_alone() -> None:
    root = logging.getLogger()
    root_out = io.StringIO()
    root_handler = logging.StreamHandler(root_out)
    root.addHandler(root_handler)
    try:
        first, second = io.StringIO(), io.StringIO()
        logs.configure(stream=first)
        logger = logs.configure("WARNING", fmt="text", stream=second)
        assert len([h for h in logger.handlers if isinstance(h, logs._Handler)]) == 1
        logger.warning("once")
        logger.info("below the level")
        assert first.getvalue() == ""
        assert len(lines(second)) == 1 and lines(second)[0].endswith("apportion: once")
        assert root_out.getvalue() == ""  # not printed twice through the root's handlers
        assert root_handler in root.handlers
    finally:
        root.removeHandler(root_handler)


def test_configure_refuses() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        logs.configure("LOUD")
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        logs.configure(fmt="xml")  # type: ignore[arg-type]
