"""Named errors of the learning code.

`models` imports nothing from `app`; the worker and the API translate these into their own errors.
Each error names the field at fault in `field` and carries a stable machine-readable `code`.
"""


class ModelError(Exception):
    """Base of every error `models` raises on purpose."""

    code = "model_error"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class EmptySlot(ModelError):
    """A slot with no usable events was handed to an update."""

    code = "empty_slot"


class InvalidEvents(ModelError):
    """Events that cannot be learned from: NaN or infinite values, mismatched lengths."""

    code = "invalid_events"


class UnknownIds(ModelError):
    """Row indices or ids that the model does not hold."""

    code = "unknown_ids"


class IncompatibleState(ModelError):
    """A saved learner state that this code cannot resume (format, shapes, configuration)."""

    code = "incompatible_state"


class InvalidInputFile(ModelError):
    """An interactions file the replay cannot parse."""

    code = "invalid_input_file"
