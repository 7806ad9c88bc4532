"""Fine-tuning: region labels, fg/bg mini-batches and the training loop."""
