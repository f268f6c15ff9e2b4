import sys

from manidp.cli import main

sys.exit(main())
