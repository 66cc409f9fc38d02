"""The lab's one error class, apart so that every lab module can raise it without importing another."""


class LabError(RuntimeError):
    """A lab directory that cannot be used as asked (built with another config, incomplete, ...)."""
