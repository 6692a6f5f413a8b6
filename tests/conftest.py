# Make the repository root importable (train_gpt, aurora, data.*, tools.*) whatever pytest's cwd.
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
