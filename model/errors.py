"""Errors the model layer raises for things a user can fix; each message names the culprit."""


class ModelError(ValueError):
    """Base of user-fixable model errors (bad config, bad checkpoint, bad input)."""


class ConfigError(ModelError):
    """A config.json that this runtime cannot serve; the message names the offending key."""


class CheckpointError(ModelError):
    """A checkpoint file or tensor that is missing, malformed or of an unsupported dtype."""


class InputError(ModelError):
    """A request the model cannot run: empty prompt, out-of-vocabulary id, too long, bad sampling."""
