"""bench_loss.py end to end on tiny sizes: every CPU provider gated, timed, measured, and written out."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_loss  # noqa: E402
from action_kernels.testing import tolerance  # noqa: E402


@pytest.mark.slow
def test_bench_smoke_writes_table_csv_and_json(tmp_path, capsys):
    import torch

    rc = bench_loss.main(["--sizes", "300,200,32", "--repeats", "2", "--out", str(tmp_path),
                          "--providers", "naive,compile,chunked,class_graph,triton"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "naive" in out and "chunked" in out and "skipped" in out  # triton on CPU is skipped with its reason
    csv = (tmp_path / "bench_loss.csv").read_text().splitlines()
    assert len(csv) == 1 + 4 + 3 + 4  # header, soft, topk, anatomical
    [json_file] = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    png = tmp_path / json_file.replace(".json", ".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / json_file).read_text())
    rows = {(r["op"], r["provider"]): r for r in data["results"]}
    timed = [("soft", "naive"), ("soft", "compile"), ("soft", "chunked"), ("topk", "naive"), ("topk", "chunked"),
             ("anatomical", "naive"), ("anatomical", "class_graph"), ("anatomical", "chunked")]
    for key in timed:
        assert rows[key]["total_ms"] > 0 and rows[key]["peak_extra_mib"] is not None, key
        assert rows[key]["gate_error"] <= tolerance(torch.float32, 0.01), key  # the benchmark's own gate
    assert rows[("soft", "triton")]["total_ms"] is None and rows[("soft", "triton")]["note"].startswith("skipped")
    assert data["environment"]["torch"]


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="N,K,D"):
        bench_loss.main(["--sizes", "300,200"])
    with pytest.raises(SystemExit, match="--ops: unknown"):
        bench_loss.main(["--ops", "softmax"])


def test_presets_quick_sweeps_keys_and_targets_match_the_kernel_issues():
    import torch

    from workloads import PRESETS, WORKLOADS

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for work in WORKLOADS.values():
        quick = work.default_sizes(cpu, "quick")
        assert max(n for n, _, _ in quick) <= 4096, work.name  # small enough for a one-minute CPU run
    assert len({k for _, k, _ in WORKLOADS["soft"].default_sizes(cpu, "quick")}) >= 2  # a K sweep for the plot
    assert (65536, 65536, 128) in WORKLOADS["soft"].default_sizes(cuda, "targets")
    assert WORKLOADS["topk"].default_sizes(cpu, "targets") == [(16384, 16384, 128)]
    assert PRESETS == ("quick", "targets", "tiny")
    for work in WORKLOADS.values():  # the per-call overhead preset: small sizes, a baseline and chunked
        assert max(n * k for n, k, _ in work.default_sizes(cpu, "tiny")) <= 2 ** 20, work.name
        assert "chunked" in work.tiny_providers and set(work.tiny_providers) <= set(work.providers)
    with pytest.raises(SystemExit):
        bench_loss.main(["--preset", "huge"])


def test_plot_keeps_each_providers_colour_across_panels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.colors
    import matplotlib.pyplot as plt

    from workloads import WORKLOADS

    op_a, op_b = list(WORKLOADS)[:2]
    rows = [bench_loss.Result(**{**{f: None for f in bench_loss.Result.__dataclass_fields__}, "op": op, "provider": p,
                                 "K": k, "total_ms": 1.0 + k, "peak_extra_mib": 2.0, "dtype": "fp32", "device": "cpu"})
            for op, providers in ((op_a, ("naive", "chunked")), (op_b, ("chunked", "triton", "naive")))
            for p in providers for k in (64, 128)]
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    assert bench_loss.write_plot(rows, str(tmp_path / "p.png"))
    seen = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            seen.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert set(seen) == {"naive", "chunked", "triton"}
    assert all(len(c) == 1 for c in seen.values()) and len({c.pop() for c in seen.values()}) == 3
