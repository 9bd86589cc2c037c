import sys

from lawa_diffusion.cli.entry import main

sys.exit(main())
