from doconv.benchmarks.bench_gluon import main

raise SystemExit(main())
