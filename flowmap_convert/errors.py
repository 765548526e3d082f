"""User-facing errors: one sentence naming the problem and the fix; the CLI maps them to exit code 2."""


class FlowmapError(Exception):
    """A problem with the user's input (not a bug): shown as one line, exit code 2, no traceback."""
