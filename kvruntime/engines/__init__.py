"""Model engines: compute only the uncached suffix of a prompt on top of restored KV."""
