"""payment-service: the Payment aggregate of a booking system."""
