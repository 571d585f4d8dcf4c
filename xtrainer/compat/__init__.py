"""transformers' Trainer surface that is not the training loop: metric reports, FLOP counts, memory metrics,
the run banner, resume checks, the Hub and model cards. The Trainer keeps thin methods that call these."""
