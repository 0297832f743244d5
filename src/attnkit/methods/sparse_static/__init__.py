"""Static (position-only) sparse patterns."""

from . import block_local_global, dilated, neighborhood, power, sliding_window, streaming  # noqa: F401
