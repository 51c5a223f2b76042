"""``python -m minimind_course.chat``: see :mod:`minimind_course.client.terminal`."""

import sys

from minimind_course.client.terminal import main

if __name__ == "__main__":
    sys.exit(main())
