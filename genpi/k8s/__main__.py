import sys

from genpi.k8s.cli import main

sys.exit(main())
