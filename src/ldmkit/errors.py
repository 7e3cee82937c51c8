"""The one exception type for user mistakes: its message names the problem and the fix."""


class LDMKitError(ValueError):
    """A user-facing error (bad input, missing or corrupt file, unsupported configuration).

    It subclasses ValueError so code written against diffusers' ``except ValueError`` keeps working.
    """
