"""``python -m minimind_course.train_tiny``: see :mod:`minimind_course.training.train`."""

import sys

from minimind_course.training.train import main

if __name__ == "__main__":
    sys.exit(main())
