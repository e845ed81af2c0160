import sys

from alora.serving.cli import main

sys.exit(main())
