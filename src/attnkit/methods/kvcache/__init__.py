"""KV-cache policies: what to keep, evict, quantize or retrieve during prefill and decode.

One policy per file (paper + arXiv id at the top, a config dataclass, its rule);
``base.py`` is the contract (``CachePolicy`` and its ``mode``, ``LayerView``, ``Store``),
``common.py`` the helpers policies share, ``quantize.py`` the quantizers of the storing
policies, and ``attnkit.kvcache`` / ``attnkit.kvcache_layer`` the cache itself.
"""

from . import a2sf, adakv, h2o, keydiff, knorm, pyramidkv, random, snapkv, streaming, tova  # noqa: F401
from . import chunkkv, compose, duo, expected_attention, quantized, quest, scissorhands  # noqa: F401
from . import infllm, recycled, retrieval, tokenselect  # noqa: F401
from . import think, zipcache  # noqa: F401
