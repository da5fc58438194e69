"""Benchmark programs: DO-Conv against the framework's native convolution, side by side.

Each module (``bench_torch``, ``bench_keras``, ``bench_gluon``) has a ``main(argv=None)``
that prints ratios measured in one process, alternating the variants, and returns 0.
``doconv bench`` runs those whose framework is installed; ``benchmarks/`` at the
repository root holds thin scripts that call them.
"""
