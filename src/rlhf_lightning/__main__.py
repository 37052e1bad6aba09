import sys

from rlhf_lightning.cli import main

sys.exit(main())
