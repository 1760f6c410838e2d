import sys

from msgrun.report.cli import main

sys.exit(main())
