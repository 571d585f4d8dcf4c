"""Run transformers' own trainer tests against transformers (control) or xtrainer, one file at a time.

Each file runs in its own pytest process with pytest-timeout, writing a JUnit XML report, a log and
its wall time under `--out/<label>/`. The tests are read from a transformers checkout (a working tree
with tests/trainer/, or a bare git directory whose HEAD is exported to a temporary folder); nothing of
transformers is copied into this repository.

Usage (from the repository root; see tools/conformance/README.md):
    python tools/conformance/run_trainer_tests.py --transformers /path/to/transformers \
        --mode xtrainer --backend torch --out /tmp/conformance/main
    python tools/conformance/summarise.py --control /tmp/conformance/main/control \
        --candidate /tmp/conformance/main/xtrainer-torch
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# Test-only packages transformers' trainer tests import that the lane venvs do not pin.
EXTRA_PACKAGES = ("parameterized==0.9.0",)
EXTRA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "xtrainer-conformance", "extra")
DEFAULT_FILES = ("test_trainer*.py", "test_training_args.py")


def is_bare_git(path: str) -> bool:
    out = subprocess.run(
        ["git", "-C", path, "rev-parse", "--is-bare-repository"], capture_output=True, text=True, check=False
    )
    return out.returncode == 0 and out.stdout.strip() == "true"


def export_tests(transformers: str, workdir: str) -> str:
    """A folder holding transformers' `tests/` tree: the checkout itself, or HEAD of a bare repo exported."""
    if not is_bare_git(transformers):
        if not os.path.isdir(os.path.join(transformers, "tests", "trainer")):
            raise SystemExit(f"{transformers} has no tests/trainer/: give a transformers checkout or bare git dir")
        return transformers
    target = os.path.join(workdir, "transformers-tests")
    os.makedirs(target, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", transformers, "archive", "HEAD", "tests"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", target], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive of {transformers} failed")
    return target


def ensure_extras(python: str) -> None:
    """Install the test-only packages into a side folder (never into the shared lane venv)."""
    probe = subprocess.run(
        [python, "-c", "import parameterized"], env=_env(python, {}), capture_output=True, check=False
    )
    if probe.returncode == 0:
        return
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--target", EXTRA_DIR, *EXTRA_PACKAGES], check=True
    )


def _env(python: str, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [REPO, HERE, EXTRA_DIR]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # No hub here: fail fast instead of waiting on the network.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.update(extra)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers", required=True, help="transformers checkout or bare git directory")
    parser.add_argument("--mode", choices=("control", "xtrainer"), required=True)
    parser.add_argument("--backend", help="xtrainer backend forced on TrainingArguments left at 'auto'")
    parser.add_argument("--out", required=True, help="results folder; this run writes <out>/<label>/")
    parser.add_argument("--label", help="sub-folder name (default: control or xtrainer-<backend>)")
    parser.add_argument("--files", nargs="*", default=list(DEFAULT_FILES), help="globs under tests/trainer/")
    parser.add_argument("--timeout", type=int, default=300, help="pytest-timeout seconds per test")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the lane venv to test in")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--keep-tests", action="store_true", help="keep the exported tests folder")
    args = parser.parse_args(argv)

    label = args.label or ("control" if args.mode == "control" else f"xtrainer-{args.backend or 'auto'}")
    out = os.path.abspath(os.path.join(args.out, label))
    os.makedirs(out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="xtrainer-conformance-")
    try:
        root = export_tests(os.path.abspath(args.transformers), workdir)
        trainer_dir = os.path.join(root, "tests", "trainer")
        files = sorted({os.path.basename(p) for g in args.files for p in glob.glob(os.path.join(trainer_dir, g))})
        if not files:
            raise SystemExit(f"no test files match {args.files} in {trainer_dir}")
        ensure_extras(args.python)
        extra = {"XTRAINER_CONFORMANCE": args.mode}
        if args.backend:
            extra["XTRAINER_CONFORMANCE_BACKEND"] = args.backend
        timings_path = os.path.join(out, "timings.json")
        timings = {}
        if os.path.exists(timings_path):  # a rerun of some files keeps the others' figures
            with open(timings_path) as f:
                timings = json.load(f)["files"]
        for name in files:
            stem = name[:-3]
            extra["XTRAINER_CONFORMANCE_REPORT"] = os.path.join(out, f"{stem}.redirect.json")
            cmd = [
                args.python, "-m", "pytest", "-p", "conformance_redirect", "-p", "no:cacheprovider",
                f"tests/trainer/{name}", "-q", "-rfEs", f"--timeout={args.timeout}",
                # Python's own traceback format: pytest's source-reading one crashed (INTERNALERROR,
                # "AST constructor recursion depth mismatch") after a test's RecursionError on 3.11.7,
                # losing the results of the file's remaining tests.
                "--tb=native",
                f"--junitxml={os.path.join(out, stem + '.xml')}", "-o", "junit_family=xunit1",
            ]
            if args.keyword:
                cmd += ["-k", args.keyword]
            start = time.monotonic()
            with open(os.path.join(out, f"{stem}.log"), "w") as log:
                rc = subprocess.run(cmd, cwd=root, env=_env(args.python, extra), stdout=log, stderr=subprocess.STDOUT).returncode
            timings[name] = {"seconds": round(time.monotonic() - start, 1), "exit_code": rc}
            print(f"[{label}] {name}: exit {rc} in {timings[name]['seconds']} s", flush=True)
        with open(timings_path, "w") as f:
            json.dump({"command": sys.argv, "files": timings}, f, indent=1)
    finally:
        if args.keep_tests:
            print(f"tests kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
