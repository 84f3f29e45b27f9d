"""``python -m benchmarks.kernel_aot``: see the package's docstring."""
import sys

from .cli import main

sys.exit(main())
