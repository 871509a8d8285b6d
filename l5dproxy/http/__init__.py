"""HTTP proxying: the neutral exchange, the h1 and h2 codec ends, the dispatcher."""
