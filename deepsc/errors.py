"""Errors meant for the user: the CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class DeepSCError(Exception):
    """Base of every error whose message is written for a person, not a developer."""

    exit_code = 2


class InputError(DeepSCError):
    """Bad input data: names the case (or file) and the problem.

    >>> str(InputError("ct_0007", "slice positions have a gap of 10 mm"))
    'ct_0007: slice positions have a gap of 10 mm'
    """

    def __init__(self, case: str, problem: str):
        self.case = str(case)
        self.problem = problem
        super().__init__(f"{self.case}: {problem}")

    def __reduce__(self):
        # rebuilt from (case, problem), so the error crosses process boundaries (DataLoader
        # workers, process pools) instead of failing to unpickle there
        return (type(self), (self.case, self.problem))


class ConfigError(DeepSCError):
    """Bad or missing setting in params.yaml or on the command line."""


class ValidationFailed(DeepSCError):
    """A blocking data-validation check failed (the report names every case and check)."""

    exit_code = 3
