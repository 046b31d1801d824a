"""Pure domain: the Payment aggregate, money, events and the processor port."""
