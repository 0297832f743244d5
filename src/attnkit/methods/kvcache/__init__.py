"""KV-cache policies: what to keep, evict, quantize or retrieve during prefill and decode."""
