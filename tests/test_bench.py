"""bench.py runs end to end for a few steps and prints its table (speed itself is not tested)."""

import subprocess
import sys
from pathlib import Path

import pytest

import bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.long
def test_quick_bench_prints_the_table_with_every_column(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--quick", "--generated",
                             "--device", "cpu", "--batch_size", "16", "--data_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| device"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(bench.COLUMNS)
    rows = [line for line in lines if line.startswith("| cpu")]
    assert len(rows) == 4  # (a) and (b), on 28 px grey and 32 px colour images
    assert any("(a) VanVAE" in r for r in rows) and any("(b) GenerativeZoo" in r for r in rows)
    for r in rows:
        cells = [cell.strip() for cell in r.strip("|").split("|")]
        assert len(cells) == len(bench.COLUMNS)
        assert float(cells[bench.COLUMNS.index("train images/s")]) > 0
    assert sum("(a)/(b) training images/s" in line for line in lines) == 2
    assert "matmul peak" in result.stdout
    assert "AVX2 " in result.stdout and "AVX512-BF16 " in result.stdout and "AMX " in result.stdout


@pytest.mark.long
def test_the_iw_bound_bench_prints_its_floor_and_the_measured_time(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--iw", "2", "--generated",
                             "--matmul_size", "256"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    floor = next(line for line in result.stdout.splitlines() if line.startswith("| floor"))
    measured = next(line for line in result.stdout.splitlines() if line.startswith("| measured"))
    assert float(floor.split("|")[2]) > 0 and float(measured.split("|")[3]) > 0
    assert "page faults" in result.stdout and "AVX-512 " in result.stdout



@pytest.mark.long
def test_the_loading_bench_prints_its_three_ways_to_load(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--loading", "40", "--generated"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| images.py") or
            line.startswith("| ImageFolder")]
    assert len(rows) == 4 and all(float(row.split("|")[3]) > 0 for row in rows), result.stdout


def test_the_profile_shows_where_a_training_step_spends_its_time(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--profile", "2", "--warmup", "1",
                             "--generated", "--batch_size", "16", "--profile_rows", "200"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("profile: (a) VanVAE's training step") and "AVX2 " in line for line in lines)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines
            if line.startswith("| aten::")]
    shares = [float(cells[4]) for cells in rows]
    assert shares == sorted(shares, reverse=True) and 50 < sum(shares) <= 100.05
    assert any(cells[0] == "aten::convolution_backward" for cells in rows)  # the layers are there
