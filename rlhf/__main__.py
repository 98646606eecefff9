import sys

from rlhf.cli import main

sys.exit(main())
