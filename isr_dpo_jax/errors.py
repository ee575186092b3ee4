"""The user errors of a run: what the `isr-dpo` command reports as one line.

A UserError says what is wrong with the run's inputs (its config, a file,
a checkpoint) in one line that names them and what to do; the command prints
that line and exits with status 2, without a traceback (`--verbose` or
ISR_DPO_VERBOSE=1 shows one). Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem the user fixes in the run's inputs, not in this code."""
