"""Benchmarks of optax_guard against adam alone and optax's own clipping.

Run ``python -m benchmarks --help`` from the repository root; results go to
``benchmarks/results/`` as JSON and Markdown.
"""
