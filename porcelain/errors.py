"""Errors that the pipeline raises on purpose, each with a message a user can act on."""

from __future__ import annotations


class PorcelainError(Exception):
    """Base class of the project's own errors."""


class DataError(PorcelainError):
    """Deterministic problem with the input data: retrying cannot help."""


class ConfigError(PorcelainError):
    """The run configuration is invalid."""


class WeightsError(PorcelainError):
    """Weights are missing, of an unsafe format, or do not fit the model."""


class NonFiniteLossError(PorcelainError, FloatingPointError):
    """A training loss became NaN or inf."""

    def __init__(self, stage: str, step: int, value: float, hint: str | None = None):
        self.stage, self.step, self.value = stage, step, value
        hint = hint or (
            "likely causes: a learning rate too high for this batch size, fp16 overflow "
            "(try dtype bf16 or fp32), or corrupt/constant input images"
        )
        super().__init__(f"{stage}: loss became {value} at step {step}; {hint}")


# Retrying these cannot change the outcome.
NOT_RETRYABLE: tuple[type[BaseException], ...] = (DataError, ConfigError, WeightsError, NonFiniteLossError)
