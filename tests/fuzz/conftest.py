"""Hypothesis settings for the fuzz tests.

    make test    the "quick" profile: a fixed seed (derandomized) and a small budget, seconds
    make fuzz    the "long" profile (RLHF_FUZZ_PROFILE=long): a fresh random seed, 2000 examples
                 per test (about ten minutes in all), and a deadline per example, so an input
                 that makes a reader crawl is reported too

A failing example is printed with the seed that reproduces it (`--hypothesis-seed=N`).
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

settings.register_profile(
    "quick", max_examples=60, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The deadline is generous: it catches a reader whose time grows with some input (a regular
# expression that backtracks, an alias that expands), not a busy machine.
settings.register_profile(
    "long", max_examples=2000, deadline=timedelta(seconds=5), database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("RLHF_FUZZ_PROFILE", "quick"))
