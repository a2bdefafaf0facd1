"""The GPU benchmark script stays working: a dry run at tiny sizes on the CPU (issue 16)."""

import json

import pytest

from benchmarks import gpu


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    gpu.main(["--dry-run", f"--json={out}"])
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if r["what"] == "FAILED"]
    by = {r["what"]: r for r in rows}
    assert {r["section"] for r in rows} == {"ep", "attacks", "deq"}
    # Correctness rows: float32 against the float64 reference on the tiny net.
    for name in ("JAX", "PyTorch") if gpu.torch is not None else ("JAX",):
        assert by[f"{name} float32 vs float64: free states (T=3), max rel. error"]["ours"] < 1e-5
        assert by[f"{name} float32 vs float64: EP gradient (T1=3, T2=2), rel. error"]["ours"] < 1e-4
    speed = [r for r in rows if r["unit"] in ("images/s", "samples/s", "steps/s (T1-equivalent)")]
    assert len(speed) >= 15 and all(r["ours"] > 0 for r in speed)
    assert "| section | measurement |" in capsys.readouterr().out


def test_gpu_benchmark_without_torch(monkeypatch, tmp_path):
    # CI has no PyTorch: the JAX side still runs and says what it skipped.
    monkeypatch.setattr(gpu, "torch", None)
    monkeypatch.setattr(gpu, "TORCH_MISSING", "No module named 'torch'", raising=False)
    out = tmp_path / "gpu.json"
    gpu.main(["--dry-run", "--sections=check", f"--json={out}"])
    rows = json.loads(out.read_text())["rows"]
    assert any("skipped: No module named 'torch'" in r["note"] for r in rows)
    assert any(r["what"].startswith("JAX float32 vs float64") for r in rows)


def test_fair_protocol_alternates_and_flags_overlapping_spreads():
    from benchmarks import fair

    order = []
    res = fair.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b"] * 4  # one warm-up each, then strictly alternating rounds
    order.clear()
    fair.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2, False)
    assert order == ["a", "b"] * 2  # warmup=False: the timed rounds only
    assert all(t.n == 3 and t.low <= t.median <= t.high for t in res.values())
    slow = fair.Timing(2.0, 1.9, 2.1, 0.0, 3)
    fast = fair.Timing(1.0, 0.9, 1.1, 0.0, 3)
    line = fair.ratio_line(("ours", fast), ("ref", slow))
    assert line.startswith("ratio 2.00x") and "overlap" not in line
    close = fair.Timing(1.8, 1.0, 2.2, 0.0, 3)
    assert "not a result" in fair.ratio_line(("ours", close), ("ref", slow))
    assert fair.best({"jax x": slow, "jax y": fast, "torch": close}, "jax")[0] == "jax y"
