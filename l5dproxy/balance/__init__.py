"""Which endpoint: endpoints, P2C peak-EWMA, failure accrual, the retry budget."""
