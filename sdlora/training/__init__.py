"""The training run's pieces, one module each: the accelerator and precision, the optimizer and schedule,
per-batch conditioning, the step, stop requests, the run's state, the periodic actions of the loop, the
setup before it and the outputs after it. train_text_to_image_lora.py keeps the loop visible over them."""
