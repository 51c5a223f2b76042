"""``python -m minimind_course.bench``: see :mod:`minimind_course.bench.cli`."""

import sys

from minimind_course.bench.cli import main

sys.exit(main())
