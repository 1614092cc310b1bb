"""The project's own exceptions: each message names the file, field or limit at fault."""


class VQAError(Exception):
    """Base class of every error the project raises on purpose."""


class DataError(VQAError, ValueError):
    """A dataset file is missing, malformed, or inconsistent."""


class InputError(VQAError, ValueError):
    """A user's image or question cannot be answered (empty, corrupt, too large, ...)."""


class CheckpointError(VQAError, ValueError):
    """A checkpoint folder is missing a file, is corrupt, or is not safe to load."""


class OptionError(VQAError, ValueError):
    """A training or model option (a flag, or a value in config.json) is outside its allowed range."""
