import sys

from hamal.cli import main

sys.exit(main())
