"""The one exception type for expected user mistakes: the CLI prints it without a traceback."""


class SharedLLMError(Exception):
    """A problem with the user's input (a path, a file, a flag) described in plain words."""
