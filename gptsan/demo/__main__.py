import sys

from gptsan.demo.run import main

sys.exit(main())
