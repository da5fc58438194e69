"""Cross-backend conformance: every installed adapter against doconv.core and against each other.

For every case of tests/cross_cases.py and every data layout of each framework: canonical
parameters go in through set_params and come back unchanged through get_params; the fused
kernel equals doconv.core.fold; the forward pass equals the core's reference. With
DOCONV_CROSS_OUT set (tox does), each adapter's kernels and outputs are also written there,
and tests/cross_compare.py checks the files of all environments against each other.
"""

import os
from pathlib import Path

import numpy as np
import pytest

import cross_adapters
import cross_cases

ADAPTERS = cross_adapters.available()
CASES = cross_cases.cases()
RESULTS: dict = {adapter.name: {} for adapter in ADAPTERS}

pytestmark = pytest.mark.skipif(not ADAPTERS, reason="no framework installed")


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: a.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_adapter_matches_core(adapter, case):
    params = cross_cases.params(case)
    want_kernel, want_output = cross_cases.reference(case)
    x = cross_cases.inputs(case)
    for layout in adapter.layouts:
        layer = adapter.build(case, layout)
        adapter.set_params(layer, params)
        back = adapter.get_params(layer)
        for name, value in params.items():
            if value is None:
                assert back[name] is None, name
            else:
                assert back[name].dtype == np.float32 and np.array_equal(back[name], value), name
        kernel = adapter.fused_kernel(layer, layout)
        output = adapter.forward(layer, x, layout)
        ok, err = cross_cases.close(kernel, want_kernel)
        assert ok, f"{adapter.name}/{layout}: fused kernel differs from core.fold by {err:.2e}"
        ok, err = cross_cases.close(output, want_output)
        assert ok, f"{adapter.name}/{layout}: output differs from the core reference by {err:.2e}"
        RESULTS[adapter.name][f"{case['id']}|{layout}|kernel"] = kernel
        RESULTS[adapter.name][f"{case['id']}|{layout}|output"] = output


def test_adapters_in_this_process_agree_and_results_are_written():
    """Runs after the table: pairwise comparison in-process, then the files for cross_compare."""
    filled = {name: r for name, r in RESULTS.items() if r}
    if not filled:
        pytest.skip("the table did not run (selected out)")
    names = sorted(filled)
    worst = {}
    for a in names:
        for b in names:
            if a >= b:
                continue
            for key, value in filled[a].items():
                case_id, _, what = key.split("|")
                for other_key, other in filled[b].items():
                    if other_key.startswith(case_id + "|") and other_key.endswith("|" + what):
                        ok, err = cross_cases.close(value, other)
                        assert ok, f"{a} vs {b}, {key} vs {other_key}: {err:.2e}"
                        worst[(a, b)] = max(worst.get((a, b), 0.0), err)
    for (a, b), err in sorted(worst.items()):
        print(f"in-process worst relative difference {a} vs {b}: {err:.2e}")
    out = os.environ.get("DOCONV_CROSS_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for adapter in ADAPTERS:
            if filled.get(adapter.name):
                np.savez_compressed(
                    Path(out) / f"{adapter.name}.npz", __version__=np.array(adapter.version), **filled[adapter.name]
                )
