"""Parameter-efficient fine-tuning: LoRA banks, prompt tuning, frozen bases (DESIGN.md: Adapters)."""
