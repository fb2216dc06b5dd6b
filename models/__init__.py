"""What a model is and how it is loaded.

Models come from local folders only: nothing is ever fetched from a model hub,
so the hub libraries are told to stay offline before any of them is imported.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
