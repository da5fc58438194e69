from doconv.benchmarks.bench_keras_layer import main

raise SystemExit(main())
