"""Compare a conformance run with its control: pass rate by file, and the failures grouped by cause.

Reads the JUnit XML files that run_trainer_tests.py writes (one per test file) for the control
(transformers itself) and a candidate (xtrainer on some backend). Only tests that pass on the control
count. Each remaining failure gets a category from its first exception (missing member, unexpected
keyword, transformers/accelerate internals, ...), and categories are ranked by how many tests they hold:
that is how many tests fixing the cause would move past their first failure.

Usage:
    python tools/conformance/summarise.py --control OUT/control --candidate OUT/xtrainer-torch [--details]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def read_results(folder: str) -> dict[str, dict]:
    """{test id: {"file", "outcome" (passed|failed|error|skipped), "message", "text"}} from JUnit files."""
    results = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.xml"))):
        file = os.path.basename(path)[:-4] + ".py"
        root = ET.parse(path).getroot()
        for case in root.iter("testcase"):
            test_id = f"{file}::{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            outcome, message, text = "passed", "", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = "failed" if tag == "failure" else tag
                    message, text = node.get("message", ""), node.text or ""
                    break
            if test_id in results and results[test_id]["outcome"] != "passed":
                continue  # an error in teardown after a pass/fail: keep the first verdict
            results[test_id] = {"file": file, "outcome": outcome, "message": message, "text": text}
        if not list(root.iter("testcase")):
            results[f"{file}::<collection>"] = {"file": file, "outcome": "error", "message": "no tests collected", "text": ""}
    return results


# (regex on the exception text, category template). First match wins; groups fill the template.
RULES = [
    (r"AttributeError: '(\w+)' object has no attribute '(\w+)'", "missing member: {0}.{1}"),
    (r"AttributeError: type object '(\w+)' has no attribute '(\w+)'", "missing class attribute: {0}.{1}"),
    (r"AttributeError: <class '[\w.]*?(\w+)'> does not have the attribute '(\w+)'",
     "mock.patch.object target missing: {0}.{1}"),
    (r"AttributeError: <module '([\w.]+)'[^>]*> does not have the attribute '(\w+)'",
     "mock.patch target missing: {0}.{1}"),
    (r"TypeError: ([\w.]+)\(\) got an unexpected keyword argument '(\w+)'", "unexpected keyword: {0}({1}=)"),
    (r"TypeError: ([\w.]+)\(\) missing \d+ required positional arguments?: (.+)", "missing argument: {0}({1})"),
    (r"ImportError: cannot import name '(\w+)' from '([\w.]+)'", "cannot import {0} from {1}"),
    (r"ModuleNotFoundError: No module named '([\w.]+)'", "module not installed: {0}"),
    (r"Failed: Timeout", "timeout"),
]


def first_exception(text: str, message: str) -> str:
    """The line that names the exception a test died of (pytest's 'E   ' lines, else the message)."""
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    for ln in lines:
        if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt|Warning)\b|Failed:|assert ", ln):
            return ln
    return (lines[0] if lines else message.splitlines()[0] if message else "(no message)")[:300]


def categorise(text: str, message: str) -> tuple[str, str]:
    """(category, exception line) for one failure."""
    line = first_exception(text, message)
    blob = f"{message}\n{text}"
    for pattern, template in RULES:
        m = re.search(pattern, blob)
        if m:
            return template.format(*m.groups()), line
    if re.search(r"\baccelerate\b|\.accelerator\b|AcceleratorState", blob) and "xtrainer" not in line:
        return "touches accelerate objects", line
    if line.startswith(("AssertionError", "assert ")) or "AssertionError" in line:
        return "assertion (behaviour differs)", line
    kind = re.match(r"([\w.]+(?:Error|Exception))", line)
    return (f"{kind.group(1)} (other)" if kind else "other"), line


def summarise(control: dict, candidate: dict) -> dict:
    baseline = {t for t, r in control.items() if r["outcome"] == "passed"}
    by_file = collections.defaultdict(lambda: {"control_pass": 0, "pass": 0, "fail": 0, "skip": 0, "missing": 0})
    failures = []
    for test in sorted(baseline):
        row = by_file[control[test]["file"]]
        row["control_pass"] += 1
        got = candidate.get(test)
        if got is None:
            # The whole file failed to collect, or the run stopped: count as failed with the file's reason.
            collect = candidate.get(f"{control[test]['file']}::<collection>")
            row["missing"] += 1
            if collect:
                failures.append((test, *categorise(collect["text"], collect["message"])))
            else:  # an unfinished run must not pass for a behaviour failure
                failures.append((test, "no result (run unfinished or test not collected)", "test not run"))
        elif got["outcome"] == "passed":
            row["pass"] += 1
        elif got["outcome"] == "skipped":
            row["skip"] += 1
            failures.append((test, f"skipped: {got['message'][:120]}", got["message"][:300]))
        else:
            row["fail"] += 1
            failures.append((test, *categorise(got["text"], got["message"])))
    return {"by_file": dict(by_file), "failures": failures}


def render(summary: dict, control: dict, details: bool) -> str:
    out = ["| file | control tests (pass / all) | xtrainer pass | rate |", "|---|---|---|---|"]
    totals = [0, 0, 0]
    files = sorted({r["file"] for r in control.values()})
    for file in files:
        all_tests = sum(1 for r in control.values() if r["file"] == file and not r["file"].endswith("<collection>"))
        row = summary["by_file"].get(file, {"control_pass": 0, "pass": 0})
        rate = f"{100 * row['pass'] / row['control_pass']:.0f}%" if row["control_pass"] else "-"
        out.append(f"| {file} | {row['control_pass']} / {all_tests} | {row['pass']} | {rate} |")
        totals[0] += row["control_pass"]
        totals[1] += all_tests
        totals[2] += row["pass"]
    rate = f"{100 * totals[2] / totals[0]:.1f}%" if totals[0] else "-"
    out.append(f"| **total** | {totals[0]} / {totals[1]} | {totals[2]} | **{rate}** |")

    groups = collections.defaultdict(list)
    for test, category, line in summary["failures"]:
        groups[category].append((test, line))
    out += ["", f"Failures over control-passing tests: {len(summary['failures'])}, in {len(groups)} categories "
            "(ranked by tests held)", ""]
    for category, tests in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        out.append(f"- **{len(tests)}** {category}")
        if details:
            for test, line in tests:
                out.append(f"    - {test}: `{line[:200]}`")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--details", action="store_true", help="list every failing test under its category")
    parser.add_argument("--json", help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    control, candidate = read_results(args.control), read_results(args.candidate)
    summary = summarise(control, candidate)
    print(render(summary, control, args.details))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
