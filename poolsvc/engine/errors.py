"""The engine's errors. Each says what to change; the service maps each class to one status."""


class EngineError(Exception):
    """An error the caller can act on (as opposed to a bug)."""


class InvalidInputError(EngineError):
    """The request cannot be served as written: bad values, over-long input, wrong model kind."""


class ModelNotFoundError(EngineError):
    """The request names a model this server does not serve."""


class OverloadedError(EngineError):
    """A capacity limit is reached; retrying later may succeed."""


class DeadlineExceededError(EngineError):
    """The caller's deadline passed before the work could run; it was dropped, not computed."""


class UnsupportedError(EngineError):
    """The server does not implement what the request asks for."""


class UnavailableError(EngineError):
    """The engine is not ready yet, or is shutting down."""


class ModelLoadError(EngineError):
    """A model's files cannot be loaded; raised at start-up."""
