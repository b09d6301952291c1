import sys

from poolsvc.cli import main

sys.exit(main())
