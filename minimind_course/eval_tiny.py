"""``python -m minimind_course.eval_tiny``: see :mod:`minimind_course.training.evaluate`."""

import sys

from minimind_course.training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
