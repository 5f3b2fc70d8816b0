"""Exceptions the CLI turns into one clear message and a non-zero exit."""


class GazeError(Exception):
    """Base of every error gaze-edge reports to a user: the message says what and what to do."""


class CheckpointError(GazeError):
    """A checkpoint folder is missing files, or its config or tensors are wrong."""


class InputError(GazeError):
    """A user input (image, prompt, option) cannot be used."""
