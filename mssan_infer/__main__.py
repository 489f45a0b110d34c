"""``python -m mssan_infer index|search|remove|info|serve``: the runtime's command line
(:mod:`mssan_infer.cli`)."""

from __future__ import annotations

import sys

from mssan_infer.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
