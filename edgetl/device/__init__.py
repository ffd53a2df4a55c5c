"""What devices are and what a model costs on them: device profiles, the machine's fingerprint, the budget
rule, latency and memory prediction, and the kernel model fitted by calibration (numpy only)."""
