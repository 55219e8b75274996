"""`sft`: supervised fine-tuning, cross-entropy on the trained (assistant) tokens."""
