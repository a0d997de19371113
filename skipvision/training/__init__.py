"""Fine-tuning: conversation data, the training step and loop, run checkpoints, and the
synthetic shapes data the shipped model was trained on."""
