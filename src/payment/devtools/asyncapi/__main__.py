"""`python -m payment.devtools.asyncapi`: write or check docs/asyncapi.yaml."""

from payment.devtools.asyncapi import main

raise SystemExit(main())
