"""The `sanitize` tox env: doconv._foldkernel under AddressSanitizer and UBSan.

    python tests/run_sanitized.py [pytest arguments]

1. Compiles the kernel as setup.py does, with -Werror=stack-usage: no function may keep a stack
   frame that grows with the problem (a variable-length array sized by K or D_mul fails here).
2. Builds it again with -fsanitize=address,undefined over the copy installed in this environment
   (never into the checkout's build/, which other environments install from).
3. Runs pytest (on tests/test_foldkernel.py unless a test path is given) with the sanitizer runtimes
   preloaded and every report fatal; the reports go to files, printed at the end, and any report
   fails the run, even one that did not abort it.

Linux with gcc only: the sanitizer runtimes are found with ``gcc -print-file-name``.
"""

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "doconv" / "_foldkernel.c"
STACK_LIMIT = 16384  # bytes per frame; the largest today is the 25x25 float64 accumulators (~6 KiB)
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def gcc(*args: str) -> None:
    include = "-I" + sysconfig.get_paths()["include"]
    command = ["gcc", "-O3", "-g", "-fPIC", "-Wall", include, *args, str(SOURCE)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def installed_extension() -> Path:
    """Where this environment's doconv keeps its compiled kernel (the package must be installed)."""
    import doconv

    package = Path(doconv.__file__).parent
    if package == SOURCE.parent:
        sys.exit("doconv is imported from the checkout, not installed: install it first (tox does)")
    return package / ("_foldkernel" + sysconfig.get_config_var("EXT_SUFFIX"))


def runtime(name: str) -> str:
    path = subprocess.run(
        ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path):  # gcc echoes the bare name when it has no such library
        sys.exit(f"gcc has no {name}: install the sanitizer runtimes (libasan, libubsan)")
    return path


def main(pytest_args: list[str]) -> int:
    gcc("-c", f"-Werror=stack-usage={STACK_LIMIT}", "-o", os.devnull)
    target = installed_extension()
    gcc("-shared", *SANITIZE, "-o", str(target))
    reports = Path(tempfile.mkdtemp(prefix="doconv-sanitize-"))
    log = f"log_path={reports / 'report'}"  # files, not stderr: pytest's capture would lose them on abort
    env = dict(
        os.environ,
        LD_PRELOAD=" ".join([runtime("libasan.so"), runtime("libubsan.so")]),
        # Python and the frameworks keep memory until exit by design: leaks are not reported.
        ASAN_OPTIONS=f"detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:{log}",
        UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:{log}",
        DOCONV_REQUIRE_KERNEL="1",
        DOCONV_REQUIRE_SANITIZED="1",
    )
    paths = [arg for arg in pytest_args if (ROOT / arg.split("::")[0]).exists()]
    command = [sys.executable, "-m", "pytest", *pytest_args, *([] if paths else ["tests/test_foldkernel.py"])]
    print("+", " ".join(command), flush=True)
    returncode = subprocess.run(command, cwd=ROOT, env=env).returncode
    found = sorted(reports.iterdir())
    for report in found:
        print(f"\n--- {report.name} ---\n{report.read_text(errors='replace')}", file=sys.stderr)
    if found:
        print(f"run_sanitized: {len(found)} sanitizer report(s) (above)", file=sys.stderr)
        return returncode or 1
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
