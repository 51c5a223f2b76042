"""``python -m minimind_course.export``: see :mod:`minimind_course.model.export`."""

import sys

from minimind_course.model.export import main

if __name__ == "__main__":
    sys.exit(main())
