"""Models around transformers: policy, critic, chat formatting, generation, built-ins."""
