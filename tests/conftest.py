import sys
from pathlib import Path

# Tests import the project's flat modules (data, util, ...) and tests/fakedata.py by name.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
