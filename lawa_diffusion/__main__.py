import sys

from lawa_diffusion.cli import main

sys.exit(main())
