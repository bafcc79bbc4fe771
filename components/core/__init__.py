"""What every layer shares: the strict config base, the user-error type, stage results and atomic writes,
lineage (data version, git commit), progress reporting, device and precision choice, code hashing."""
