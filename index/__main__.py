"""`python -m index` / `torchrun --nproc-per-node N -m index ...`: the build-index job."""

import sys

from index.cli import main

if __name__ == "__main__":
    sys.exit(main())
