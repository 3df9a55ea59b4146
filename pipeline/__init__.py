"""convsink's library: config, masks, attention, model, losses, training, export, streaming cache, evaluation."""
