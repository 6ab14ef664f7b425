import sys

from service.cli import main

if __name__ == "__main__":  # not when --workers' spawned processes import it
    sys.exit(main())
