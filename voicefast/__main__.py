import sys

from voicefast.cli import main

sys.exit(main())
