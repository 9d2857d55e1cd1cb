"""One job on several devices: process groups (`util`), Ulysses collectives (`ulysses`), the CFG x Ulysses hooks
around the CogVideoX transformer (`sequence_parallel`), and a local launcher for the ranks (`launch`)."""
