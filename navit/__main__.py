import sys

from navit.cli import main

sys.exit(main())
