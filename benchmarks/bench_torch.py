"""Runner: DOConv2d vs nn.Conv2d ratios (see src/doconv/benchmarks/bench_torch.py)."""

from doconv.benchmarks.bench_torch import main

if __name__ == "__main__":
    raise SystemExit(main())
