"""sdcompress: train stochastic-depth ResNets, prune their blocks by learned survival statistics, and ship them."""

__version__ = "0.1.0"
