"""Fleet simulation: shipped data sets, non-IID partitions, the experiment runner and the CLI."""
