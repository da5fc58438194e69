from doconv.benchmarks.bench_keras import main

raise SystemExit(main())
