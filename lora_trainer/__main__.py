"""`python -m lora_trainer ...`"""

import sys

from lora_trainer.cli import main

sys.exit(main())
