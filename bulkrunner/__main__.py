"""``python -m bulkrunner``."""

from bulkrunner.client.cli import main

if __name__ == "__main__":
    main()
