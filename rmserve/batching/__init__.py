"""Dynamic batching: one queue per model, token-budget batch formation, futures. Knows nothing of torch."""
