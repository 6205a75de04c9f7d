"""Without bitsandbytes the package still imports, and quantizing says how to install it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_missing_bitsandbytes_gives_install_instructions():
    # A None entry in sys.modules makes `import bitsandbytes` fail, as on a machine without it.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None
        import torch
        import bnb_lightning
        config = bnb_lightning.QuantizationConfig(bits=4)
        try:
            bnb_lightning.quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)
        except ImportError as error:
            print("ERROR:", error)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ERROR: bnb_lightning needs bitsandbytes>=0.45" in result.stdout
    assert "pip install 'bitsandbytes>=0.45'" in result.stdout
