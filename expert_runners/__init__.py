"""Expert runners: one module per expert family, a shared contract, and the Findings they produce."""
