"""The embedded farmyard world: its generator (`farm`), the gold scorer that knows its truth
(`gold`), the gold evaluation of a policy (`evaluation`), and the per-home cache of its files
(`cache`). No stage trains on the gold scorer; it only measures."""
