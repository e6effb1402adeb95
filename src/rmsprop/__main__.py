import sys

from rmsprop.tools.cli import main

sys.exit(main())
