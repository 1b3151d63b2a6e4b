"""Pure-torch KV storage and compression: the ragged per-head pool, its manager, ragged attention.

Nothing here imports SGLang."""
