"""Model folders and the models in them: finding and checking a pipeline folder (folders), loading its
parts for training (loading), writing a fine-tuned one (output), prompts against its tokenizer
(prompts), LoRA adapters (lora/), the hub's cache (hub) and tiny models built from configs (tiny)."""
