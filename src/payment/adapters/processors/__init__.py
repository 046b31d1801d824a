"""Payment processor adapters: fake and Stripe (sandbox = Stripe in test mode)."""
