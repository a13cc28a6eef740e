"""The data service: data workers that decode, augment and store samples, and the consumers that pull batches from them."""
