"""Compose the GPU validation kit's report from what scripts/gpu_check.sh left in its output folder.

Inputs (any may be missing when a stage failed or ran out of time; the report then says so):
``gpu_stages.tsv`` (stage, exit code, seconds, cap), ``gpu_tests.xml`` (pytest's JUnit XML),
``gpu_tests.txt``, ``gpu_bench.json`` / ``gpu_bench.md`` (benchmarks/conftest.py's tables).
Outputs: ``gpu_report.md`` and ``gpu_report.json`` in the same folder, and a short table on stdout.
Exit code 0 when every stage that ran passed, 1 otherwise.

    python scripts/gpu_report.py OUT_DIR [--dry-run=0|1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The rows the short table shows: the fast paths (the baselines and ceilings are in the full tables).
HEADLINE = ("dpvr", "route_split[cuda]", "fuse_merge[cuda]", "route_split[triton]", "fuse_merge[triton]",
            "route_split[cpu]", "fuse_merge[cpu]")


def environment() -> dict:
    """GPU and software versions, and whether the compiled extension loaded with its CUDA kernels."""
    env: dict = {"python": platform.python_version()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = torch.cuda.get_device_name()
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["multiprocessors"] = props.multi_processor_count
            env["compute_capability"] = f"{props.major}.{props.minor}"
        else:
            env["gpu"] = None
    except ImportError as e:
        env["torch"] = f"missing ({e})"
    for name in ("triton", "transformers", "flash_attn"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    sys.path.insert(0, str(ROOT))
    try:
        from dpvr_kernels.ops import _extension

        env["extension"] = _extension.available()
        env["extension_cuda_kernels"] = _extension.has_cuda()
        env["extension_note"] = _extension.unavailable_reason() or ""
    except Exception as e:  # report, never crash the report
        env["extension"] = False
        env["extension_note"] = f"{type(e).__name__}: {e}"
    return env


def read_stages(out: Path) -> list[dict]:
    path = out / "gpu_stages.tsv"
    if not path.exists():
        return []
    stages = []
    for line in path.read_text().splitlines():
        name, rc, seconds, cap = line.split("\t")
        status = {"skipped": "skipped", "deadline": "not run (deadline reached)", "0": "passed",
                  "124": "out of time", "4": "not available here (see its log)"}.get(rc, f"failed (exit {rc})")
        stages.append({"stage": name, "status": status, "seconds": int(seconds), "cap_s": int(cap)})
    return stages


def read_tests(out: Path) -> dict:
    """Counts and the failing tests from pytest's JUnit XML."""
    path = out / "gpu_tests.xml"
    if not path.exists():
        return {"ran": False}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"ran": False, "error": f"{path.name}: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, properties = [], {}
    for case in root.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props:  # what a test measured besides pass/fail (record_property)
            properties[test] = props
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                msg = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                failed.append({"test": test, "kind": tag, "message": msg})
    return {"ran": True, **counts, "failed": failed, "measured": properties}


def read_bench(out: Path) -> dict:
    """The benchmark tables: the eager stage's and the compiled stage's groups together."""
    bench: dict = {"machine": None, "groups": {}}
    errors = []
    for name in ("gpu_bench.json", "gpu_bench_compiled.json"):
        try:
            part = json.loads((out / name).read_text())
        except (OSError, ValueError) as e:
            errors.append(f"{name}: {e}")
            continue
        bench["machine"] = bench["machine"] or part.get("machine")
        bench["groups"].update(part.get("groups", {}))
    if errors:
        bench["error"] = "; ".join(errors)
    return bench


def read_capacity(out: Path) -> dict:
    try:
        return json.loads((out / "gpu_capacity.json").read_text())
    except (OSError, ValueError) as e:
        return {"error": f"gpu_capacity.json: {e}"}


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _x(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def short_table(stages: list[dict], tests: dict, bench: dict, capacity: dict | None = None) -> list[str]:
    lines = ["| stage | status | seconds (cap) |", "|---|---|---:|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} ({s['cap_s']}) |" for s in stages]
    lines.append("")
    if tests.get("ran"):
        lines.append(f"CUDA tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped")
        lines += [f"  FAILED {f['test']}: {f['message']}" for f in tests["failed"][:10]]
        lines += [f"  {test.split('::')[-1]}: {props}" for test, props in tests["measured"].items()]
    else:
        lines.append("CUDA tests: no results (see gpu_tests.txt)")
    lines.append("")
    lines += ["| benchmark | case | median ms | vs baseline | ideal | of ideal | of copy |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for group, rows in bench.get("groups", {}).items():
        for r in rows:
            if r["name"] in HEADLINE:
                lines.append(f"| {group} | {r['name']} | {r['median_ms']:.3f} | {_x(r['speedup_vs_baseline'])} "
                             f"| {_x(r['ideal'])} | {_pct(r['fraction_of_ideal'])} | {_pct(r['fraction_of_ceiling'])} |")
    if not bench.get("groups"):
        lines.append("| (no benchmark rows: see gpu_bench_log.txt) | | | | | | |")
    if capacity and "max_batch" in capacity:
        mb = capacity["max_batch"]
        ratio = f" ({capacity['ratio']:.2f}x)" if capacity.get("ratio") else ""
        lines += ["", f"Largest batch, {capacity['prompt_tokens']} + {capacity['new_tokens']} tokens, static cache "
                  f"({capacity['limit']}): stock {mb.get('stock')}, DPVR-LF {mb.get('dpvr')}{ratio}"]
    elif capacity:
        lines += ["", f"Largest batch: no result ({capacity.get('error')}; see gpu_capacity_log.txt)"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", type=int, default=0, choices=(0, 1))
    args = parser.parse_args(argv)
    out: Path = args.out
    env = environment()
    stages, tests, bench, capacity = read_stages(out), read_tests(out), read_bench(out), read_capacity(out)
    ok = bool(stages) and all(s["status"] in ("passed", "skipped", "not available here (see its log)")
                              for s in stages)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report = {"date": stamp, "dry_run": bool(args.dry_run), "ok": ok, "environment": env, "stages": stages,
              "tests": tests, "benchmarks": bench, "capacity": capacity}
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1) + "\n")

    title = "GPU check" + (" (DRY RUN on CPU: checks the kit, no GPU figures)" if args.dry_run else "")
    md = [f"# {title}, {stamp}", "", "Produced by `bash scripts/gpu_check.sh` (tables: medians; every speedup "
          "is against the baseline row of the same table, measured in the same run; ideal = cost_model's ratio: "
          "FLOPs for prefill, bytes read (weights + KV) for decode; of copy = bandwidth against a device copy of the same bytes).", "", "## Environment", ""]
    md += [f"- {k}: {v}" for k, v in env.items()]
    md += ["", "## Summary", ""] + short_table(stages, tests, bench, capacity)
    md += ["", "## CUDA tests (tail of the log)", "", "```"]
    log = out / "gpu_tests.txt"
    md += log.read_text().splitlines()[-30:] if log.exists() else ["(no log)"]
    md += ["```", "", "## vLLM plugin on CUDA (tail of the log)", "", "```"]
    log = out / "gpu_vllm.txt"
    md += log.read_text().splitlines()[-12:] if log.exists() else ["(no log)"]
    md += ["```", "", "## Benchmarks", ""]
    for name in ("gpu_bench.md", "gpu_bench_compiled.md"):
        tables = out / name
        md += tables.read_text().splitlines() if tables.exists() else [f"(no {name}: see the stage's log)"]
    (out / "gpu_report.md").write_text("\n".join(md) + "\n")

    print()
    print(f"gpu_check: report in {out / 'gpu_report.md'} and gpu_report.json "
          f"({env.get('gpu') or 'no GPU'}, torch {env.get('torch')}); {'all stages passed' if ok else 'NOT all passed'}")
    print("\n".join(short_table(stages, tests, bench, capacity)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
