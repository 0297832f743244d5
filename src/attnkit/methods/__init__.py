"""Built-in methods; importing this package registers them all."""

from . import act, exact, kvcache, linear, sparse_dynamic, sparse_static  # noqa: F401
