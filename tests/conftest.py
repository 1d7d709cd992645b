import sys
from pathlib import Path

# Lets tests import the shared naive reference (tests/reference.py).
sys.path.insert(0, str(Path(__file__).parent))
