"""Fixtures: a process group per test whose processes always stop, and a fresh broker URL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import ARTIFACTS, ProcessGroup, free_broker_url


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path) -> Iterator[ProcessGroup]:  # type: ignore[no-untyped-def]
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(group.dump_logs())


@pytest.fixture
def broker_url() -> str:
    return free_broker_url()


@pytest.fixture(scope="session")
def artifacts_dir():  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
