"""Model-free stand-ins and attackers for tests and benches: they speak the real
protocol through the real worker, and no device install path imports them."""
