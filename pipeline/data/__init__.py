"""Data in, tensors out: the readers of every accepted format (`formats`), prompt files
(`prompts`), padding and packing (`packing`), and the digests that reuse and resume compare
(`fingerprint`)."""
