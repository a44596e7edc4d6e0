import sys

from streamkd.cli import main

sys.exit(main())
