"""The GPU validation kit (scripts/gpu_check.sh + scripts/gpu_report.py) as far as it runs without a GPU.

* without a GPU the script exits at once with a clear message (code 3);
* ``--dry-run`` runs every stage on CPU (the CUDA tests are collected and skipped, the benchmark suites run
  one round each) and writes the report: this is the benchmark suites' smoke test as well (their inline
  checks: route/merge results, live KV bytes == cost model);
* a stage over the deadline and failing tests make the report (and the script) say NOT passed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without a GPU")


def _run_kit(*args: str, timeout: int = 60, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@no_gpu_only
def test_gpu_check_without_gpu_exits_clearly():
    proc = _run_kit()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stdout


def test_dry_run_writes_the_report(tmp_path):
    proc = _run_kit("--dry-run", timeout=400, GPU_CHECK_OUT=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all stages passed" in proc.stdout
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["dry_run"] and report["ok"]
    stages = ["build", "tests", "device_map", "benchmarks", "capacity", "benchmarks_compiled", "vllm_cuda"]
    assert [s["stage"] for s in report["stages"]] == stages
    # The vLLM stage needs vLLM's CUDA build and a GPU: here it says so and is not counted as passed.
    assert report["stages"][-1]["status"] == "not available here (see its log)"
    assert "not run: " in (tmp_path / "gpu_vllm.txt").read_text()
    assert not json.loads((tmp_path / "gpu_vllm.json").read_text())["ran"]
    capacity = report["capacity"]  # the dry run's CPU budget admits the whole (small) search range
    assert capacity["max_batch"] == {"stock": 2, "dpvr": 2} and capacity["new_tokens"] == 2
    # the device_map stage ran its CPU/disk-offload variant and passed
    assert '"placement": "cpu+disk"' in (tmp_path / "gpu_device_map.txt").read_text()
    assert report["environment"]["torch"] == torch.__version__
    # Every CUDA-marked test was collected (and skipped here): the kit runs the whole CUDA set on a GPU.
    tests = report["tests"]
    assert tests["ran"] and tests["failures"] == tests["errors"] == 0 and tests["skipped"] >= 150

    groups = report["benchmarks"]["groups"]
    kinds = {g.split()[0] for g in groups}
    assert kinds == {"decode", "route_split", "fuse_merge", "prefill"}, kinds
    for group, rows in groups.items():
        baselines = [r for r in rows if r["baseline"]]
        assert len(baselines) == 1, group
        assert all(r["speedup_vs_baseline"] > 0 for r in rows), group
        if group.startswith(("prefill", "decode")):
            dpvr = next(r for r in rows if r["name"] == "dpvr")
            assert dpvr["ideal"] > 1 and dpvr["fraction_of_ideal"] > 0, group
        else:  # kernel groups: bandwidth against the device-copy ceiling row
            assert sum(r["ceiling"] for r in rows) == 1, group
            assert all(r["fraction_of_ceiling"] > 0 for r in rows), group
    decode_notes = [r["note"] for g, rows in groups.items() if g.startswith("decode") for r in rows]
    assert all("prompt KV" in n for n in decode_notes) and any("x of stock" in n for n in decode_notes)
    md = (tmp_path / "gpu_report.md").read_text()
    assert "DRY RUN" in md and "| stage | status |" in md and "### prefill" in md and "Largest batch" in md


def test_deadline_reached_is_reported_as_not_passed(tmp_path):
    proc = _run_kit("--dry-run", GPU_CHECK_OUT=str(tmp_path), GPU_CHECK_DEADLINE_S="5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NOT all passed" in proc.stdout and "deadline reached" in proc.stdout
    assert not (tmp_path / "gpu_bench.json").exists()  # nothing ran


def test_report_lists_failed_tests_and_missing_benchmarks(tmp_path):
    (tmp_path / "gpu_stages.tsv").write_text("build\t0\t40\t120\ntests\t1\t60\t150\nbenchmarks\t124\t180\t180\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_cuda" name="test_ok"/><testcase classname="tests.test_cuda" name="test_x">'
        '<failure message="assert 0.25 &lt;= 0.125">trace</failure></testcase>'
        '<testcase classname="tests.test_cuda" name="test_y"><properties>'
        '<property name="host_syncs_per_forward" value="{\'stock\': 2, \'patched\': 3}"/></properties></testcase>'
        '</testsuite></testsuites>')
    proc = subprocess.run([sys.executable, "scripts/gpu_report.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert not report["ok"]
    assert [s["status"] for s in report["stages"]] == ["passed", "failed (exit 1)", "out of time"]
    assert report["tests"]["passed"] == 2 and report["tests"]["failures"] == 1
    assert report["tests"]["failed"] == [{"test": "tests.test_cuda::test_x", "kind": "failure",
                                          "message": "assert 0.25 <= 0.125"}]
    assert report["tests"]["measured"] == {"tests.test_cuda::test_y": {"host_syncs_per_forward": "{'stock': 2, 'patched': 3}"}}
    assert "FAILED tests.test_cuda::test_x" in proc.stdout and "test_y: {'host_syncs_per_forward'" in proc.stdout
    assert "no benchmark rows" in proc.stdout
