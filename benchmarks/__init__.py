"""Benchmarks of rqvae_ray against baselines: ``python -m benchmarks w1`` and ``python -m benchmarks w2 --pois N``.

Not part of the installed package; run from the repository root. Hubs, outputs, logs and results go under ``.bench/``.
"""
