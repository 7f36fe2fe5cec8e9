"""The errors a user can fix, as one base class (a leaf module: it imports nothing).

`UserError`: what was asked for cannot be done as asked (a flag or config value, a path, data or
a checkpoint that does not match); the message says what is wrong and what to do. The binaries
(experiments/cli.py) print it as one line and exit 2 without a traceback; any other exception is
a bug and keeps its traceback. The library's own user errors derive from it: ConfigError,
TokenizerMismatchError, BadInputError, CheckpointError, UnreadableCheckpointError and
`InvalidInput` (a ValueError, for the other values a user gives).
"""


class UserError(Exception):
  """A user-fixable error; the message names the problem and the fix."""


class InvalidInput(UserError, ValueError):
  """A value the user gave (a model source, a tokenizer spec, a data directory) is invalid."""
