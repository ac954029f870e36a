"""Engine: training (`train_and_evaluate`), evaluation, the model-selection protocol and selection fidelity.
May import runtime, data and core."""
