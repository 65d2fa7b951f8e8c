"""A hook for tests: append this run's KVCERTSYNC_* variables as one JSON line to argv[1]."""

import json
import os
import sys

with open(sys.argv[1], "a") as out:
    variables = {k: v for k, v in os.environ.items() if k.startswith("KVCERTSYNC_")}
    out.write(json.dumps(variables) + "\n")
