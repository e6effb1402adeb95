import sys

from rmsprop.cli import main

sys.exit(main())
