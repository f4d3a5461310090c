"""Client side: runs in the notebook process (specs, environments, kernels, pools, sessions)."""
