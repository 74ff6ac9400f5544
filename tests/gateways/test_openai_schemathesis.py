"""Schemathesis fuzzes the live gateway from its own /openapi.json: no server errors, answers that match it.

The worker runs the synthetic engine (fake tokens, no model) under the name the
schema's examples use, so that generated requests reach real generation.
Bounded: a fixed seed, a few examples per operation, well under a minute.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.gateways.test_openai_helpers import start_gateway
from tests.support import ProcessGroup, mesh_env

#: Keeps each generated request small (valid values stay valid): the synthetic worker generates as fast as the
#: CPU allows, and n=128 choices of thousands of tokens each would only measure a busy 2-core machine.
HOOKS = """
import schemathesis

CAPS = {"n": 4, "max_tokens": 32, "max_completion_tokens": 32}


@schemathesis.hook
def before_call(context, case, kwargs):
    if isinstance(case.body, dict):
        for name, cap in CAPS.items():
            value = case.body.get(name)
            if type(value) is int and value > cap:
                case.body[name] = cap
"""

#: Every check but positive_data_acceptance: a schema-valid request can still be a 400 for reasons
#: the schema cannot know (max_tokens over a model's context, prompts times n over 128 choices).
EXCLUDED_CHECKS = "positive_data_acceptance"


def test_schemathesis_finds_no_server_errors(processes: ProcessGroup, broker_url: str, tmp_path: Path) -> None:
    processes.broker(broker_url)
    # A large capacity: fuzzing fires many requests at once and cancels some, and this test is about the
    # gateway, not about the worker refusing work while a cancelled request is still winding down.
    processes.synthetic_worker(broker_url, "fuzz", "--capacity", "512", models="smollm2-135m-instruct")
    gateway = start_gateway(processes, broker_url, "--default-max-tokens", "32", models=("smollm2-135m-instruct",))
    schemathesis = Path(sys.executable).with_name("schemathesis")
    (tmp_path / "fuzz_hooks.py").write_text(HOOKS)
    env = mesh_env(SCHEMATHESIS_HOOKS="fuzz_hooks", PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            EXCLUDED_CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--workers",
            "1",
            "--max-time",
            "25",
            "--request-timeout",
            "20",
            "--no-color",
            "--generation-database",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    gateway_log = processes.processes[-1].output()
    assert "Traceback" not in gateway_log, gateway_log[-4000:]
