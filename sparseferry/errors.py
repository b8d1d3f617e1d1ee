"""The one base class of every error sparseferry raises on bad input.

The CLI prints these as one line (`sparseferry: error: ...`) and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class SparseferryError(ValueError):
    """Bad input: the message names the file, tensor or value at fault and what was expected."""
