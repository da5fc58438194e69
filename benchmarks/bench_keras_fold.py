from doconv.benchmarks.bench_keras_fold import main

raise SystemExit(main())
