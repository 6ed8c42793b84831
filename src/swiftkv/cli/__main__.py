import sys

from swiftkv.cli import main

sys.exit(main())
