"""grouplora."""
