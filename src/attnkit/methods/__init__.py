"""Built-in methods; importing this package registers them all."""

from . import exact, sparse_static  # noqa: F401
