"""Measurement: `sdaot bench` (every backend side by side in one process), its peers, and the kernel timer;
recorded results live in results/ beside the command that produced each."""
