"""The cross-environment comparison: every framework's results against core and each other.

Each tox env that runs tests/test_cross.py writes <framework>.npz under
<results>/<envname>/. This script (the `compare` tox env, NumPy only) loads them all,
rebuilds the core's reference for every case, and checks every file against it and
against every other file: the newest TensorFlow (numpy 2) meets mxnet 1.9.1 (numpy 1.23)
here. It prints the worst relative error per file and fails if any comparison is out of
tolerance, a case is missing, or a framework wrote nothing.

Usage: python tests/cross_compare.py RESULTS_DIR [--require torch,keras,gluon]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import cross_cases  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--require", default="torch,keras,gluon", help="frameworks that must have results")
    args = parser.parse_args(argv)
    files = sorted(args.results.glob("*/*.npz"))
    loaded = {f"{f.parent.name}/{f.stem}": dict(np.load(f)) for f in files}
    problems = []
    for framework in filter(None, args.require.split(",")):
        if not any(label.endswith("/" + framework) for label in loaded):
            problems.append(f"no results from {framework} under {args.results}")
    references = {case["id"]: cross_cases.reference(case) for case in cross_cases.cases()}
    print(f"{'results':<22} {'version':<34} {'entries':>7} {'vs core':>10} {'vs others':>10}")
    for label, data in loaded.items():
        version = str(data.pop("__version__", "?"))
        worst_core = worst_other = 0.0
        seen = {key.split("|")[0] for key in data}
        problems += [f"{label}: case {c} missing" for c in references if c not in seen]
        for key, value in data.items():
            case_id, layout, what = key.split("|")
            want = references[case_id][0 if what == "kernel" else 1]
            ok, err = cross_cases.close(value, want)
            worst_core = max(worst_core, err)
            if not ok:
                problems.append(f"{label} {key}: {err:.2e} from core")
            for other_label, other in loaded.items():
                if other_label == label:
                    continue
                for other_key, other_value in other.items():
                    if other_key.startswith(case_id + "|") and other_key.endswith("|" + what):
                        ok, err = cross_cases.close(value, other_value)
                        worst_other = max(worst_other, err)
                        if not ok:
                            problems.append(f"{label} {key} vs {other_label} {other_key}: {err:.2e}")
        print(f"{label:<22} {version:<34} {len(data):>7} {worst_core:>10.2e} {worst_other:>10.2e}")
    if problems:
        print(f"{len(problems)} problem(s):")
        print("\n".join(problems[:50]))
        return 1
    print(f"all {len(loaded)} result files agree with core and with each other over {len(references)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
