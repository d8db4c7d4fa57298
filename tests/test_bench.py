"""bench.py runs end to end for a few steps and prints its table (speed itself is not tested)."""

import subprocess
import sys
from pathlib import Path

import bench

REPO = Path(__file__).resolve().parents[1]


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



def test_the_loading_bench_prints_its_three_ways_to_load(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--loading", "40", "--generated"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| images.py") or
            line.startswith("| ImageFolder")]
    assert len(rows) == 4 and all(float(row.split("|")[3]) > 0 for row in rows), result.stdout
