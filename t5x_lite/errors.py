"""The base of the errors that the project's own checks raise.

A `UserError` names a problem in the user's input, configuration or files and its fix; the
command line prints it as one line (`error: ...`, exit code 2), like argparse's own errors.
Any other exception is a bug or an environment failure and keeps its traceback.
"""


class UserError(Exception):
  """An input, configuration or file the project refuses, with the message that says why."""
