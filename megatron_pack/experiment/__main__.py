import sys

from megatron_pack.experiment.compare_cli import main

sys.exit(main())
