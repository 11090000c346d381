import sys

from seqkern.cli import main

sys.exit(main())
