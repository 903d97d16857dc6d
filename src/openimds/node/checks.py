"""What `trace` and `doctor` share: a check is a named step that passes with a detail or fails
with a reason and what to do about it.

    run_checks([Check("agent-socket", probe_socket), ...], ctx)  -> [CheckResult, ...]

A probe returns a one-line detail (OK), raises `CheckFailed(reason, advice)` (FAIL) or
`CheckWarning(reason, advice)` (WARN, only where `stop_on_failure` is off). Probes take a
context object and do their I/O through it; the verdicts over captured output (`judge_*` in
trace.py and doctor.py) are pure and unit-tested.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

Ctx = TypeVar("Ctx")

OK = "ok"
FAIL = "fail"
WARN = "warn"
SKIP = "skip"


class CheckFailed(Exception):
    """The step failed; `advice` tells the operator what to look at or run."""

    def __init__(self, reason: str, advice: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.advice = advice


class CheckWarning(CheckFailed):
    """Something is off but the path can still work."""


@dataclass(frozen=True, slots=True)
class Check(Generic[Ctx]):
    name: str
    probe: Callable[[Ctx], str]
    title: str = ""  # human label; defaults to name


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: str
    detail: str
    advice: str = ""
    ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_checks(
    checks: Sequence[Check[Ctx]], ctx: Ctx, *, stop_on_failure: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run checks in order; with stop_on_failure the ones after the first FAIL are SKIP."""
    results: list[CheckResult] = []
    failed = False
    for check in checks:
        if failed and stop_on_failure:
            result = CheckResult(check.name, SKIP, "not checked: an earlier hop failed")
        else:
            t0 = clock()
            try:
                detail = check.probe(ctx)
                result = CheckResult(check.name, OK, detail, ms=(clock() - t0) * 1000)
            except CheckWarning as exc:
                result = CheckResult(check.name, WARN, exc.reason, exc.advice,
                                     (clock() - t0) * 1000)
            except CheckFailed as exc:
                result = CheckResult(check.name, FAIL, exc.reason, exc.advice,
                                     (clock() - t0) * 1000)
                failed = True
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def first_failure(results: Sequence[CheckResult]) -> CheckResult | None:
    return next((r for r in results if r.status == FAIL), None)


def render_line(result: CheckResult, width: int = 18) -> str:
    """One line per check: `OK   agent-socket       1.2 ms  listening ...`."""
    tag = result.status.upper().ljust(4)
    timing = f"{result.ms:7.1f} ms" if result.status in (OK, FAIL, WARN) else " " * 10
    line = f"{tag} {result.name.ljust(width)} {timing}  {result.detail}"
    if result.advice and result.status in (FAIL, WARN):
        line += f"\n     {'':{width}} {'':10}  -> {result.advice}"
    return line
