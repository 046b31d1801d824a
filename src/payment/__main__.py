"""`python -m payment`: the `payment-service` command."""

import sys

from payment.cli import main

sys.exit(main())
