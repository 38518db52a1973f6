import sys
from pathlib import Path

# tests import their small helpers (_paths, _run) by name
sys.path.insert(0, str(Path(__file__).resolve().parent))
