import sys

from meddl.worker.server import main

sys.exit(main())
