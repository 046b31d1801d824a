"""The one vocabulary for what is hidden: a secret, or a card number (contract 3)."""

from typing import Final

# In place of a secret: a password, an API key, a token, a payment method.
REDACTED: Final = "[REDACTED]"
# In place of a card number found in untrusted text (README, "Dead letters").
REDACTED_CARD: Final = "[REDACTED CARD]"
