"""Fuzz one API operation with schemathesis's generation and hypothesis, without schemathesis's pytest plugin.

The plugin (``schemathesis.pytest.from_fixture`` + ``@schema.parametrize()``) rewrites pytest's private node ids,
which pytest 9.2 no longer has. This does what its fuzzing phase does, through documented APIs only: one strategy per
generation mode the schema's config enables for the operation (``operation.as_strategy``, which also applies the
schema's case hooks such as ``flatmap_case``), hypothesis settings from the same config with the test's own on top,
and a failure that names the operation and a curl command reproducing each failing case.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import hypothesis
import hypothesis.strategies as st
import schemathesis
from schemathesis.errors import FailureGroup

Headers = Callable[[schemathesis.Case], Mapping[str, str] | None]


class CaseFailed(AssertionError):
    """One case the test refused: the operation, the checks that failed and how to send the request again."""

    def __init__(self, label: str, mode: str, case: schemathesis.Case, error: BaseException, curl: str) -> None:
        self.label, self.mode, self.case, self.error, self.curl = label, mode, case, error, curl
        if isinstance(error, FailureGroup):
            self.checks = sorted({name for failure in error.exceptions for name in type(failure).checks})
            # schemathesis's report: every failed check, the response and the curl command as sent
            detail = f"failed checks: {', '.join(self.checks) or '?'}\n{error.message.rstrip()}"
        else:
            self.checks = []
            detail = f"{type(error).__name__}: {error}\nReproduce with:\n\n    {curl}"
        super().__init__(f"{label} ({mode} case {case.id}): {detail}")


class OperationFailed(AssertionError):
    """Every failing case hypothesis reported for one operation."""

    def __init__(self, label: str, failures: list[CaseFailed], notes: list[str]) -> None:
        self.label, self.failures = label, failures
        message = f"{label}: {len(failures)} failing case{'s' if len(failures) > 1 else ''}"
        message += "".join(f"\n\n{failure}" for failure in failures)
        if notes:
            message += "\n\n" + "\n".join(notes)
        super().__init__(message)


def strategy(operation: schemathesis.APIOperation) -> st.SearchStrategy[tuple[str, schemathesis.Case]]:
    """Cases in every generation mode the config enables for the operation's fuzzing (``mode = "all"``: positive
    and negative), each with the schema's hooks applied, and tagged with the mode that generated it.

    The tag, not ``case.meta``: reading ``meta`` re-derives the mode of a case a hook changed (a seeded upload's raw
    bytes read as negative), so it says what the checks will think, not which strategy drew the case."""
    modes = operation.schema.config.generation_for(operation=operation, phase="fuzzing").modes
    return st.one_of(
        [operation.as_strategy(generation_mode=mode).map(lambda case, mode=mode: (mode.value, case)) for mode in modes]
    )


def fuzz(
    operation: schemathesis.APIOperation,
    test: Callable[[schemathesis.Case], object],
    *,
    settings: Mapping[str, Any],
    headers: Headers | None = None,
    sent: Counter[tuple[str, str]] | None = None,
) -> None:
    """Run ``test`` on generated cases of ``operation``; raise :class:`OperationFailed` naming each failing case.

    ``settings`` are hypothesis settings laid over those the schema's config gives (max examples, derandomize...);
    ``headers`` are the extra headers ``test`` sends with a case, for the curl command; ``sent`` counts the cases
    handed to ``test`` by (operation label, the generation mode that drew the case)."""
    label = operation.label
    base = operation.schema.config.get_hypothesis_settings(operation=operation, phase="fuzzing")

    @hypothesis.settings(base, **settings)
    @hypothesis.given(drawn=strategy(operation))
    def run(drawn: tuple[str, schemathesis.Case]) -> None:
        __tracebackhide__ = True
        mode, case = drawn
        if sent is not None:
            sent[label, mode] += 1
        try:
            test(case)
        except (Exception, FailureGroup) as exc:  # FailureGroup is a BaseExceptionGroup, not an Exception
            extra = dict(headers(case) or {}) if headers is not None else None
            raise CaseFailed(label, mode, case, exc, case.as_curl_command(headers=extra)) from exc

    try:
        run()
    except Exception as exc:
        failures = list(_case_failures(exc))
        if not failures:
            raise
        notes = [note for failure in (exc, *failures) for note in getattr(failure, "__notes__", [])]
        if not isinstance(exc, CaseFailed):  # several distinct failures, or a flaky one: hypothesis says which
            notes.insert(0, f"hypothesis: {type(exc).__name__}: {exc}")
        raise OperationFailed(label, failures, list(dict.fromkeys(notes))) from None


def _case_failures(exc: BaseException) -> Iterator[CaseFailed]:
    if isinstance(exc, CaseFailed):
        yield exc
    elif isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _case_failures(inner)
