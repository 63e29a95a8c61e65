"""`raybooth evaluate`: sample a tuned model and measure it (measure), with the small world's
classifier or the paper's CLIP and DINO judges (judges)."""
